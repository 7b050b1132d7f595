"""torchrun --nproc_per_node=2 (gloo) gives the same training as one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def _run(out: Path, nproc: int, accum: int):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), str(accum)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(SCRIPT), str(out), str(accum)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [json.loads(line)["g/loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return torch.load(out / "result-rank0.pt"), losses


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    single, l1 = _run(tmp_path / "one", 1, 1)
    double, l2 = _run(tmp_path / "two", 2, 1)
    accum, l3 = _run(tmp_path / "accum", 1, 2)
    assert len(l1) == len(l2) == 16 and l1[0] != l1[-1]
    for a, b, c in zip(l1, l2, l3):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) and abs(a - c) <= 1e-5 * max(1.0, abs(a))
    for k in single:
        torch.testing.assert_close(single[k], double[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single[k], accum[k], rtol=1e-5, atol=1e-6)
    rank1 = torch.load(tmp_path / "two" / "result-rank1.pt")
    for k in double:
        assert torch.equal(double[k], rank1[k])  # DDP keeps the replicas identical
