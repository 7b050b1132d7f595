"""A truncated JPEG in an ImageFolder dataset, through ``vfmbench run``: an error naming the file,
or with ``data.skip_corrupt=true`` a finished run whose results report one skipped image."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--preset", "smoke", "--tokenizer", "kl-vae", "--dataset", "imagefolder",
    "--set", "data.resolution=32", "--set", "data.train_images=0", "--set", "data.val_images=0",
    "--set", "tokenizer.train.images=24", "--set", "tokenizer.train.batch_size=4", "--set", "tokenizer.train.ckpt_every_images=0",
    "--set", "metrics.recon_images=6", "--set", "metrics.batch_size=4", "--set", "metrics.names=[psnr]",
    "--stages", "tokenizer,recon-eval,results",
]


def vfmbench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "vfmbench.cli", "run", *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path]:
    """3 classes x 4 train and 2 val noise images; train/cat/im1.jpg is cut to half its bytes."""
    root = tmp_path / "imnet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog", "fox"):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / cls / f"im{j}.jpg", quality=90)
    bad = root / "train" / "cat" / "im1.jpg"
    bad.write_bytes(bad.read_bytes()[:400])
    return root, bad


def test_truncated_jpeg_stops_the_run_naming_the_file(images, tmp_path):
    root, bad = images
    p = vfmbench(*TINY, "--set", f"data.root={root}", "--out", str(tmp_path / "runs"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert str(bad) in p.stderr and "data.skip_corrupt=true" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_skip_corrupt_run_finishes_and_reports_one_skipped_image(images, tmp_path):
    root, bad = images
    p = vfmbench(*TINY, "--set", f"data.root={root}", "--set", "data.skip_corrupt=true", "--set", "data.num_workers=2",
                 "--out", str(tmp_path / "runs"))
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert rows and {r["metric"] for r in rows} >= {"psnr"}
    assert all(r["protocol"]["data_skipped_images"] == 1 for r in rows)
    # the run's log names the file once; the record lists it under the train split
    assert p.stderr.count("data: skipped corrupt train image") == 1 and str(bad) in p.stderr
    record = json.loads((run_dir / "skipped-images.json").read_text())
    assert list(record) == ["train"] and [str(bad) in k for k in record["train"]] == [True]
    # a normal run's rows carry no such protocol field (the leaderboard protocol is unchanged)
    bad.unlink()
    p = vfmbench(*TINY, "--set", f"data.root={root}", "--out", str(tmp_path / "runs2"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (Path(p.stdout.strip().splitlines()[-1]) / "results.jsonl").read_text().splitlines()]
    assert rows and all("data_skipped_images" not in r["protocol"] for r in rows)
