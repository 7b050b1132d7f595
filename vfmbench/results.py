"""Long-format result rows: one JSON line per (run, metric)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import write_text

SCHEMA_VERSION = 1

# The fields every row carries (the leaderboard relies on them).
ROW_FIELDS = (
    "schema", "run_id", "label", "tokenizer", "tokenizer_version", "vfm", "vfm_version", "vfm_weights",
    "decoder", "decoder_version", "diffusion", "diffusion_version", "dataset", "dataset_version", "split",
    "resolution", "metric", "metric_version", "family", "value", "higher_is_better", "protocol", "seed",
    "date", "device", "vfmbench_version", "git", "images",
)


def protocol_id(row: dict[str, Any]) -> str:
    """What makes two values comparable: family, dataset, split, resolution, label and protocol."""
    key = {k: row.get(k) for k in ("family", "dataset", "split", "resolution", "label")}
    key["protocol"] = row.get("protocol", {})
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically (the file is either complete or absent)."""
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
    return write_text(path, text)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
    return rows
