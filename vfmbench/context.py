"""The run context a stage receives: ``StageSpec.run(ctx) -> info``.

A stage sees the resolved config, components built on demand (the tokenizer with this run's trained
weights and latent statistics, the VFM, the diffusion model), the datasets, the evaluator, its own
folder, a row writer and the distributed helpers; not the runner. The data passes every built-in
stage shares (batches of a split, posteriors, VFM-token caching) come from ``vfmbench.passes``.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, dist
from .build import BuildContext, build_diffusion, build_tokenizer, decoder_name, default_cache_dir
from .checkpoint import load_torch
from .config import RunConfig
from .errors import UserError
from .evaluate import Evaluator
from .interfaces import Tokenizer
from .passes import DataPasses
from .plugins import Host
from .results import SCHEMA_VERSION, write_rows
from .zoo import is_release


def log(msg: str) -> None:
    print(f"[vfmbench] {msg}", file=sys.stderr, flush=True)


def git_hash() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class RunContext(DataPasses):
    """What a stage may use. ``stage`` is the stage being run (set by the runner), ``folder`` its folder.

    Components: ``tokenizer()``, ``vfm()``, ``diffusion_model()``, ``components`` (the
    ``BuildContext`` tokenizer factories receive). Data: ``dataset(split)``, ``num_classes`` and the
    passes of ``vfmbench.passes.DataPasses``. Evaluation: ``evaluator()``. Files: ``stage_dir(name)``,
    ``is_done(name)``, ``write_rows(rows, images)``. Distributed: ``dist`` (``vfmbench.dist``:
    ``is_main()``, ``rank()``, ``world()``, ``barrier()``, ``gather_object``, ``broadcast_object``,
    ``shard_batches``, ``derive_seed``).
    """

    host: Host
    cfg: RunConfig
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stage: str = ""
    _components: BuildContext | None = None
    _tokenizer: Tokenizer | None = None
    _datasets: dict[str, Any] = field(default_factory=dict)
    _evaluator: Evaluator | None = None
    feature_stats: Any = None  # vfmbench.feature_cache.CacheStats of this run

    dist = dist
    log = staticmethod(log)

    def __post_init__(self) -> None:
        from .feature_cache import CacheStats

        self.feature_stats = CacheStats()

    # -- files ------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """This stage's folder of the run directory (created on first use)."""
        d = self.stage_dir(self.stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def is_done(self, stage: str) -> bool:
        spec = self.host.stages.get(stage) if stage in self.host.stages else None
        return (self.stage_dir(stage) / (spec.done_marker if spec else "done.json")).exists()

    # -- components -------------------------------------------------------------------------------
    @property
    def components(self) -> BuildContext:
        if self._components is None:
            self._components = BuildContext(host=self.host, config=self.cfg, device=self.device)
        return self._components

    def ctx(self) -> BuildContext:  # the name the runner used before the stage split
        return self.components

    def vfm(self):
        return self.components.vfm()

    def tokenizer(self) -> Tokenizer:
        """The configured tokenizer with the run's weights (``tokenizer/model.pt``) and latent
        statistics (``latents/stats.pt``) when those exist, in eval mode; built once."""
        if self._tokenizer is None:
            torch.manual_seed(self.cfg.run.seed)
            tok = build_tokenizer(self.components).to(self.device)
            model_path = self.stage_dir("tokenizer") / "model.pt"
            if model_path.exists():
                load_tokenizer_state(tok, load_torch(model_path, self.device))
            stats = self.stage_dir("latents") / "stats.pt"
            if stats.exists():
                s = load_torch(stats, self.device)
                tok.set_latent_stats(s["mean"], s["std"])
            tok.eval()
            self._tokenizer = tok
        return self._tokenizer

    def diffusion_model(self):
        tok = self.tokenizer()
        model = build_diffusion(self.host, self.cfg, tok.latent_shape(self.cfg.data.resolution), self.num_classes)
        return model.to(self.device)

    def dataset(self, split: str):
        if split not in self._datasets:
            spec = self.host.datasets.get(self.cfg.data.dataset)
            if split not in spec.splits:
                raise UserError(f"dataset {spec.name!r} has no {split!r} split (it has {', '.join(spec.splits)})")
            if self.cfg.data.num_workers < 0:
                raise UserError(f"data.num_workers must be >= 0 (0 decodes in the main process), got {self.cfg.data.num_workers}")
            if self.cfg.data.shuffle_buffer < 0:
                raise UserError(f"data.shuffle_buffer must be >= 0 (0 keeps shard order), got {self.cfg.data.shuffle_buffer}")
            self._datasets[split] = spec.factory(self.cfg.data, split)
        return self._datasets[split]

    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset("train" if "train" in self._datasets else "val"), "num_classes"))

    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.host, self.cfg, self.device, default_cache_dir(self.cfg))
        return self._evaluator

    @property
    def cache_dir(self) -> Path:
        return default_cache_dir(self.cfg)

    # -- rows -------------------------------------------------------------------------------------
    def write_rows(self, rows: list[dict[str, Any]], images: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Full result rows (``row``) from evaluator rows, written to this stage's ``rows.jsonl``
        (which the ``results`` stage collects); returns them."""
        full = [self.row(r, images=images) for r in rows]
        write_rows(self.folder / "rows.jsonl", full)
        return full

    def row(self, r: dict[str, Any], images: dict[str, str] | None = None) -> dict[str, Any]:
        """A full result row from an evaluator row (metric, value, family, protocol, ...)."""
        h, c = self.host, self.cfg
        tok = h.tokenizers.get(c.tokenizer.name)
        vfm = h.vfms.get(c.vfm.name) if tok.uses_vfm else None
        dec = decoder_name(h, c)
        diff = h.diffusion.get(c.diffusion.name)
        ds = h.datasets.get(c.data.dataset)
        family = r["family"]
        smoke = c.run.smoke or r.get("smoke", False)
        protocol = {**r["protocol"], "data_skipped_images": self.data_skips().total()} if c.data.skip_corrupt else r["protocol"]
        if is_release(tok):  # the zoo's protocol fields (vfmbench.zoo.release_protocol)
            protocol = {**protocol, **self.tokenizer().protocol()}
        return {
            "schema": SCHEMA_VERSION, "run_id": self.run_dir.name, "label": "smoke" if smoke else "official",
            "tokenizer": tok.name, "tokenizer_version": tok.version,
            "vfm": vfm.name if vfm else "", "vfm_version": vfm.version if vfm else "",
            "vfm_weights": self.vfm().weights_id if vfm else "",
            "decoder": dec, "decoder_version": h.decoders.get(dec).version if dec else "",
            "diffusion": diff.name if family == "generation" else "", "diffusion_version": diff.version if family == "generation" else "",
            "dataset": ds.name, "dataset_version": ds.version, "split": r.get("split", "val"), "resolution": c.data.resolution,
            "metric": r["metric"], "metric_version": r["metric_version"], "family": family, "value": r["value"],
            "higher_is_better": r["higher_is_better"], "protocol": protocol, "seed": c.run.seed,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "vfmbench_version": __version__, "git": git_hash(), "images": images or {},
        }


def load_tokenizer_state(tok: Tokenizer, state: dict) -> None:
    """Load trained weights into a built tokenizer; frozen parts (the VFM) may be absent from ``state``."""
    missing, unexpected = tok.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(tok.frozen_prefixes) and not k.endswith("_extra_state")]
    if unexpected or bad_missing:
        raise UserError(
            f"tokenizer weights do not match {tok.spec.name!r}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}; "
            "check tokenizer.args against the run that wrote them"
        )
