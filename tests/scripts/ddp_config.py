"""Under torchrun: the ranks resolve a run config and compare its hash
(``vfmbench.dist.check_same_config``, as ``Run.execute`` does at start), first with the same
config on every rank, then with another seed on rank 1.

Usage: ddp_config.py OUT_DIR. Writes OUT_DIR/rank{r}.json: [result of the first check, of the
second], each 'ok' or the UserError message.
"""
import json
import sys
from pathlib import Path

from vfmbench import dist
from vfmbench.config import config_hash, parse_set, resolve
from vfmbench.errors import UserError


def check(seed: int) -> str:
    cfg = resolve([parse_set(f"run.seed={seed}")])
    try:
        dist.check_same_config(config_hash(cfg.to_dict(), 64))
        return "ok"
    except UserError as e:
        return str(e)


def main():
    out = Path(sys.argv[1])
    dist.init_from_env()
    results = [check(0), check(1 if dist.rank() == 1 else 0)]
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
