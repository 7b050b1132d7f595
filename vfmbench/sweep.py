"""``vfmbench sweep FILE.yaml``: a matrix of combinations, run one after another or as Slurm jobs.

The file holds ``preset`` (optional), ``config`` (a mapping composed over the preset), ``set``
(a list of key=value overrides), ``out`` and ``matrix``: a mapping from a config key (dotted,
e.g. ``tokenizer.name``) or a flag name (tokenizer, vfm, decoder, diffusion, dataset) to a list
of values; the sweep runs their Cartesian product. ``include`` adds explicit combinations and
``exclude`` removes matching ones. A combination whose tokenizer does not use a VFM is run once
whatever the VFM axis says.

A combination that raises writes ``error.txt`` (the traceback) into its run directory and a
``failed`` row into ``<out>/sweep-status.jsonl``; the sweep goes on and exits 1 at the end. A
re-run skips finished combinations (every configured stage done) without building anything,
resumes unfinished ones from their stages' checkpoints and retries failed ones. ``--launcher
slurm`` submits each combination as a submitit job running torchrun (``vfmbench.launch``).
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, parse_set
from .errors import UserError
from .plugins import Host

FLAG_KEYS = {"tokenizer": "tokenizer.name", "vfm": "vfm.name", "decoder": "decoder.name", "diffusion": "diffusion.name", "dataset": "data.dataset"}
SPEC_KEYS = ("preset", "config", "set", "out", "matrix", "include", "exclude", "leaderboard")
STATUS_FILE = "sweep-status.jsonl"
CONFIG_FILE = "sweep-config.yaml"  # the resolved config a Slurm job runs


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The combinations of a sweep file as lists of {dotted key: value}."""
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict):
        raise UserError("sweep 'matrix' must map config keys to lists of values")
    keys = [FLAG_KEYS.get(k, k) for k in matrix]
    values = [v if isinstance(v, list) else [v] for v in matrix.values()]
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*values)] if keys else [{}]
    for what in ("include", "exclude"):
        if not all(isinstance(e, dict) for e in spec.get(what, []) or []):
            raise UserError(f"sweep '{what}' must be a list of mappings, e.g. - {{tokenizer: kl-vae, vfm: siglip}}")
    for extra in spec.get("include", []) or []:
        combos.append({FLAG_KEYS.get(k, k): v for k, v in extra.items()})
    excludes = [{FLAG_KEYS.get(k, k): v for k, v in e.items()} for e in spec.get("exclude", []) or []]
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in e.items()) for e in excludes)]
    return combos


@dataclass
class Combination:
    """One resolved combination of a sweep and its run directory."""

    combo: dict[str, Any]
    cfg: RunConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_sweep(host: Host, path: Path, out: str | None = None, extra_sets: list[str] | None = None) -> tuple[str, Path, list[Combination]]:
    """Read and validate a sweep file: (preset name, out folder, combinations). Writes nothing."""
    from .resolution import resolve_run

    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise UserError(f"sweep file {path} must hold a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise UserError(f"sweep file {path}: unknown keys {sorted(unknown)} (valid: {', '.join(SPEC_KEYS)})")
    if "leaderboard" in spec:
        from .zoo_board import check_board

        check_board(spec["leaderboard"])
    preset_name = spec.get("preset") or "smoke"
    preset = host.presets.get(preset_name)
    sets = [parse_set(s) for s in [*(spec.get("set", []) or []), *(extra_sets or [])]]  # --set of the command line last
    base = spec.get("config") or {}
    if not isinstance(base, dict):
        raise UserError(f"sweep file {path}: 'config' must be a mapping of sections (run:, data:, ...)")
    out_dir = out or spec.get("out")
    combos: list[Combination] = []
    seen = set()
    for combo in expand(spec):
        layers = [dict(preset.values), base, *[_nest(k, v) for k, v in combo.items()], *sets]
        if out_dir:
            layers.append({"run": {"out": str(out_dir)}})
        try:
            resolved = resolve_run(host, layers)
            cfg, name = resolved.cfg, resolved.run_name
        except UserError as e:
            raise UserError(f"sweep combination {json.dumps(combo, sort_keys=True)}: {e}") from None
        if name in seen:
            continue  # e.g. a tokenizer without a VFM on the VFM axis
        seen.add(name)
        combos.append(Combination(combo, cfg, Path(cfg.run.out) / name))
    folder = Path(combos[0].cfg.run.out) if combos else Path(out_dir or "runs")
    return preset_name, folder, combos


def is_finished(c: Combination) -> bool:
    """Every configured stage of the combination has marked itself done."""
    return all((c.run_dir / stage / "done.json").exists() for stage in c.cfg.run.stages)


def read_status(folder: Path) -> dict[str, dict[str, Any]]:
    """The last status row of each run in ``<folder>/sweep-status.jsonl``."""
    path = folder / STATUS_FILE
    last: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                last[row.get("run", "")] = row
    return last


def append_status(folder: Path, row: dict[str, Any]) -> None:
    """Append one row (one write of one line, then fsync)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=str) + "\n"
    with open(folder / STATUS_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _row(sweep: Path, c: Combination, status: str, launcher: str, seconds: float = 0.0, error: str = "", job_id: str = "",
         resumed: bool = False) -> dict[str, Any]:
    return {
        "sweep": str(sweep), "run": c.name, "run_dir": str(c.run_dir), "combination": c.combo, "status": status,
        "seconds": round(seconds, 2), "error": error, "launcher": launcher, "job_id": job_id, "resumed": resumed,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_error(c: Combination, text: str) -> str:
    from .checkpoint import write_text

    return str(write_text(c.run_dir / "error.txt", text))


def run_sweep(host: Host, path: Path, out: str | None = None, dry_run: bool = False, launcher: str = "local",
              slurm: Any = None, plugins_dir: str | None = None, sets: list[str] | None = None) -> int:
    """Run (or submit) every unfinished combination; 0 when none failed, else 1. A ``leaderboard``
    section of the file (out, title, published) renders the zoo leaderboard once the local runs end."""
    from .runner import log

    preset, folder, combos = load_sweep(host, path, out, sets)
    if launcher not in ("local", "slurm"):
        raise UserError(f"unknown launcher {launcher!r}: use local or slurm")
    if dry_run:
        for c in combos:
            print(json.dumps({"combination": c.combo, "run": c.name, "finished": is_finished(c)}, sort_keys=True))
        return 0
    slurm_launcher = None
    if launcher == "slurm":
        from .launch import SlurmLauncher, SlurmOptions

        slurm_launcher = SlurmLauncher(folder / "slurm", slurm or SlurmOptions())  # imports submitit (or a UserError) before any write
    todo, counts = [], {"ok": 0, "failed": 0, "skipped": 0}
    for i, c in enumerate(combos, 1):
        if is_finished(c):
            log(f"sweep {i}/{len(combos)}: finished earlier, skipped ({c.run_dir})")
            append_status(folder, _row(path, c, "skipped", launcher))
            counts["skipped"] += 1
        else:
            todo.append(c)
    if slurm_launcher is not None:
        _run_slurm(host, path, folder, preset, todo, counts, slurm_launcher, plugins_dir)
    else:
        _run_local(host, path, folder, todo, counts, len(combos))
        board = (yaml.safe_load(path.read_text()) or {}).get("leaderboard")
        if board is not None:
            from .zoo_board import write_sweep_board

            log(f"sweep leaderboard: {write_sweep_board(host, board, folder)}")
    log(f"sweep finished: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (finished earlier); "
        f"status in {folder / STATUS_FILE}")
    return 1 if counts["failed"] else 0


def _run_local(host: Host, path: Path, folder: Path, todo: list[Combination], counts: dict[str, int], total: int) -> None:
    from .runner import Run, log

    for i, c in enumerate(todo, 1):
        log(f"sweep {total - len(todo) + i}/{total}: {json.dumps(c.combo, sort_keys=True)}")
        resumed = (c.run_dir / "config.json").exists()
        (c.run_dir / "error.txt").unlink(missing_ok=True)  # a retry: the last attempt's error no longer holds
        t0 = time.time()
        try:
            Run.prepare(host, c.cfg).execute()
        except Exception:  # noqa: BLE001 - a failing combination is recorded, the sweep goes on
            err = _write_error(c, traceback.format_exc())
            append_status(folder, _row(path, c, "failed", "local", time.time() - t0, err, resumed=resumed))
            counts["failed"] += 1
            log(f"sweep: {c.name} FAILED, traceback in {err}")
            continue
        append_status(folder, _row(path, c, "ok", "local", time.time() - t0, resumed=resumed))
        counts["ok"] += 1


def write_resolved_config(c: Combination) -> Path:
    """The combination's resolved config as YAML in its run directory (``run.out`` made absolute)."""
    from .checkpoint import write_text

    d = c.cfg.to_dict()
    d["run"]["out"] = str(Path(c.cfg.run.out).resolve())
    return write_text(c.run_dir / CONFIG_FILE, yaml.safe_dump(d, sort_keys=True))


def _run_slurm(host: Host, path: Path, folder: Path, preset: str, todo: list[Combination], counts: dict[str, int],
               launcher: Any, plugins_dir: str | None) -> None:
    """Submit each combination (or wait for its job of an earlier invocation that is still queued or
    running), then record each job's outcome as it finishes."""
    from .config import resolve
    from .launch import TorchrunJob, run_module_args
    from .runner import log

    status = read_status(folder)
    jobs: dict[int, Any] = {}
    started: dict[int, float] = {}
    for i, c in enumerate(todo):
        resumed = (c.run_dir / "config.json").exists()
        last = status.get(c.name, {})
        job = launcher.attach(last.get("job_id", "")) if last.get("status") == "submitted" else None
        if job is not None:
            log(f"sweep: {c.name} is still queued or running as job {job.job_id}; waiting for it")
        else:
            cfg_file = write_resolved_config(c)
            expected = c.cfg.to_dict()
            expected["run"]["out"] = str(Path(c.cfg.run.out).resolve())
            if resolve([dict(host.presets.get(preset).values), yaml.safe_load(cfg_file.read_text())], host.stages.names()).to_dict() != expected:
                raise RuntimeError(f"{cfg_file} does not reproduce the combination's config")  # a bug, not bad input
            (c.run_dir / "error.txt").unlink(missing_ok=True)
            job = launcher.submit(TorchrunJob(run_module_args(cfg_file.resolve(), preset, plugins_dir), launcher.opts.gpus_per_node,
                                              str(c.run_dir.resolve()), os.getcwd()), f"vfmbench-{c.name}")
            log(f"sweep: {c.name} submitted as job {job.job_id} (logs in {folder / 'slurm' / str(job.job_id)})")
            append_status(folder, _row(path, c, "submitted", "slurm", job_id=str(job.job_id), resumed=resumed))
        jobs[i] = job
        started[i] = time.time()

    def done(i: int, job: Any, error: str | None) -> None:
        c = todo[i]
        seconds = time.time() - started[i]
        if error is None:
            append_status(folder, _row(path, c, "ok", "slurm", seconds, job_id=str(job.job_id)))
            counts["ok"] += 1
            return
        err = c.run_dir / "error.txt"
        if not err.exists():  # the job died before torchrun could report (e.g. a submitit or Slurm failure)
            _write_error(c, f"job {job.job_id} failed:\n{error}\n")
        append_status(folder, _row(path, c, "failed", "slurm", seconds, str(err), job_id=str(job.job_id)))
        counts["failed"] += 1
        log(f"sweep: {c.name} FAILED (job {job.job_id}), see {err}")

    launcher.wait(jobs, done)
