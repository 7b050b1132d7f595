"""Sweeps: failed combinations are recorded and the sweep goes on; re-runs do no repeated work;
the Slurm launcher (submitit) builds the torchrun command of each node and runs on submitit's
local executor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vfmbench.cli import main

ROOT = Path(__file__).resolve().parents[1]

# kl-vae at its smoke size, a few steps: a combination takes a few seconds on 2 cores.
TINY = [
    "data.train_images=64", "data.val_images=32", "tokenizer.train.images=64", "tokenizer.train.batch_size=32",
    "metrics.recon_images=32", "metrics.names=[psnr]", "run.stages=[tokenizer, recon-eval, results]",
]

# A tokenizer that builds and validates like kl-vae and raises once training starts.
FLAKY = '''
import dataclasses

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers import kl_vae


def build(args, ctx):
    tok = kl_vae.build(args, ctx)
    if BROKEN:
        def phase_loss(*a, **k):
            raise RuntimeError("flaky-vae: deliberate failure in training")
        tok.phase_loss = phase_loss
    return tok


@hookimpl
def register_tokenizers(register):
    specs = []
    kl_vae.register_tokenizers(specs.append)
    register(dataclasses.replace(specs[0], name="flaky-vae", description="kl-vae that raises in training", factory=build))
'''


def write_plugin(folder: Path, broken: bool) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "flaky.py").write_text(f"BROKEN = {broken}\n" + FLAKY)
    return folder


def write_sweep(path: Path, out: Path, matrix: dict, include: list | None = None) -> Path:
    spec = {"preset": "smoke", "out": str(out), "set": TINY,
            "config": {"component_args": {"flaky-vae": {"latent_channels": 4, "downsample": 8, "base_channels": 32,
                                                        "channel_mult": [1, 2, 2], "blocks": 1}}},
            "matrix": matrix}
    if include:
        spec["include"] = include
    path.write_text(yaml.safe_dump(spec))
    return path


def status_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep-status.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and content of every done.json and training log of a run."""
    files = [*run_dir.glob("*/done.json"), *run_dir.glob("tokenizer/train_log*.jsonl")]
    return {str(f.relative_to(run_dir)): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


@pytest.mark.slow
def test_failing_combination_is_recorded_and_reruns_do_no_repeated_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "flaky")  # --plugins-dir files are third-party plugins: allow-listed
    out, plugins = tmp_path / "runs", write_plugin(tmp_path / "plugins", broken=True)
    sweep = write_sweep(tmp_path / "s.yaml", out, {"tokenizer": ["kl-vae"], "tokenizer.train.lr": [1e-3, 2e-3]},
                        include=[{"tokenizer": "flaky-vae"}])
    argv = ["--plugins-dir", str(plugins), "sweep", str(sweep)]

    # 1st: the two kl-vae combinations finish, flaky-vae is recorded as failed, exit 1
    assert main(argv) == 1
    rows = status_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    ok_dirs = [Path(r["run_dir"]) for r in rows[:2]]
    failed = rows[2]
    assert failed["combination"] == {"tokenizer.name": "flaky-vae"} and failed["run"].startswith("flaky-vae-")
    for d in ok_dirs:
        assert (d / "results.jsonl").read_text().count('"metric": "psnr"') == 1 and not (d / "error.txt").exists()
    error = Path(failed["error"])
    assert error == Path(failed["run_dir"]) / "error.txt"
    text = error.read_text()
    assert text.startswith("Traceback") and "flaky-vae: deliberate failure in training" in text
    assert not (Path(failed["run_dir"]) / "results.jsonl").exists()
    assert "2 ok, 1 failed, 0 skipped" in capsys.readouterr().err
    before = {d: snapshot(d) for d in ok_dirs}
    assert all(any("train_log" in k for k in s) for s in before.values())
    error_mtime = error.stat().st_mtime_ns

    # the leaderboard ranks the two and lists the failure with its error file
    md = tmp_path / "board.md"
    assert main(["leaderboard", str(out), "--out", str(md)]) == 0
    board = md.read_text()
    failed_part = board.split("## Failed runs")[1]
    assert failed["run"] in failed_part and "tokenizer.name=flaky-vae" in failed_part
    assert f"(runs/{failed['run']}/error.txt)" in failed_part and (md.parent / "runs" / failed["run"] / "error.txt").is_file()
    assert failed["run"] not in board.split("## Failed runs")[0]
    assert all(d.name in board.split("## Failed runs")[0] for d in ok_dirs)

    # 2nd: finished combinations are skipped untouched; the failing one is retried and fails again
    assert main(argv) == 1
    rows2 = status_rows(out)[len(rows):]
    assert [(r["run"], r["status"]) for r in rows2] == [(rows[0]["run"], "skipped"), (rows[1]["run"], "skipped"), (failed["run"], "failed")]
    assert rows2[2]["resumed"] is True
    assert {d: snapshot(d) for d in ok_dirs} == before
    assert error.stat().st_mtime_ns > error_mtime and "deliberate failure" in error.read_text()
    assert "0 ok, 1 failed, 2 skipped" in capsys.readouterr().err

    # 3rd, after fixing the plugin: only the formerly failing combination runs, in the same directory
    write_plugin(plugins, broken=False)
    assert main(argv) == 0
    rows3 = status_rows(out)[len(rows) + len(rows2):]
    assert [(r["run"], r["status"]) for r in rows3] == [(rows[0]["run"], "skipped"), (rows[1]["run"], "skipped"), (failed["run"], "ok")]
    assert {d: snapshot(d) for d in ok_dirs} == before
    assert not error.exists() and (Path(failed["run_dir"]) / "results.jsonl").exists()
    assert "1 ok, 0 failed, 2 skipped" in capsys.readouterr().err
    assert main(["leaderboard", str(out), "--out", str(md)]) == 0
    assert "Failed runs" not in md.read_text() and failed["run"] in md.read_text()


def test_bad_sweep_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    bad_key = write_sweep(tmp_path / "a.yaml", out, {"tokenizer.train.nope": [1, 2]})
    assert main(["sweep", str(bad_key)]) == 2
    assert "tokenizer.train.nope" in capsys.readouterr().err
    bad_name = write_sweep(tmp_path / "b.yaml", out, {"tokenizer": ["kl-vae", "kl-vea"]})
    assert main(["sweep", str(bad_name)]) == 2
    assert "did you mean 'kl-vae'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("matrix: {tokenizer: [kl-vae]}\nextra: 1\n")
    assert main(["sweep", str(tmp_path / "c.yaml")]) == 2
    assert "unknown keys ['extra']" in capsys.readouterr().err
    good = write_sweep(tmp_path / "d.yaml", out, {"tokenizer": ["kl-vae"]})
    assert main(["sweep", str(good), "--nodes", "2"]) == 2
    assert "--nodes is a Slurm option; add --launcher slurm" in capsys.readouterr().err
    assert main(["sweep", str(good), "--launcher", "slurm", "--slurm-arg", "nokeyvalue"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["sweep", str(good), "--launcher", "slurm", "--nodes", "0"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_missing_submitit_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    out = tmp_path / "runs"
    sweep = write_sweep(tmp_path / "s.yaml", out, {"tokenizer": ["kl-vae"]})
    assert main(["sweep", str(sweep), "--launcher", "slurm"]) == 2
    assert "pip install 'vfmbench[slurm]'" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_lists_combinations_without_writing(tmp_path, capsys):
    out = tmp_path / "runs"
    sweep = write_sweep(tmp_path / "s.yaml", out, {"tokenizer": ["kl-vae", "sd-vae"], "vfm": ["siglip", "dinov2"]})
    assert main(["sweep", str(sweep), "--dry-run"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    # neither tokenizer uses a VFM: the VFM axis collapses to one run each
    assert [x["run"].split("-flow-dit")[0] for x in lines] == ["kl-vae", "sd-vae"]
    assert not any(x["finished"] for x in lines) and not out.exists()


# ------------------------------------------------------------------------------------------------
# Slurm launcher


class FakeJobEnvironment:
    """What submitit.JobEnvironment reports on node 1 of a 2-node allocation."""

    num_nodes, node, global_rank, job_id = 2, 1, 1, "4242"
    hostnames = ["gpu-a17", "gpu-a18"]


def test_torchrun_command_for_a_two_node_allocation(tmp_path):
    from vfmbench.launch import Allocation, run_module_args, torchrun_command

    alloc = Allocation.from_job_environment(FakeJobEnvironment())
    module = run_module_args(tmp_path / "run" / "sweep-config.yaml", "smoke", plugins_dir=str(tmp_path / "plugins"))
    cmd = torchrun_command(alloc, 8, module, python="/env/bin/python")
    assert cmd == [
        "/env/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=gpu-a17:{29500 + 4242}", "--rdzv-id=4242", "--max-restarts=0",
        "-m", "vfmbench.cli", "--plugins-dir", str((tmp_path / "plugins").resolve()),
        "run", "--preset", "smoke", "--config", str(tmp_path / "run" / "sweep-config.yaml"),
    ]
    one = torchrun_command(Allocation(1, 0, ("n1",), "7"), 0, ["vfmbench.cli", "run"], python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1", "--standalone", "--max-restarts=0",
                   "-m", "vfmbench.cli", "run"]


def test_allocation_from_slurm_environment(monkeypatch):
    from submitit.slurm.slurm import SlurmJobEnvironment

    from vfmbench.launch import Allocation

    for k, v in {"SLURM_JOB_ID": "991", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                 "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[007-008]"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    alloc = Allocation.from_job_environment(SlurmJobEnvironment())
    assert alloc == Allocation(num_nodes=2, node_rank=0, hostnames=("node007", "node008"), job_id="991")
    assert alloc.master == "node007" and alloc.port == 29500 + 991


def test_executor_parameters_map_options():
    from vfmbench.launch import SlurmOptions, executor_parameters, parse_slurm_args

    opts = SlurmOptions(partition="h100", nodes=2, gpus_per_node=8, cpus_per_task=64, timeout_min=600, account="lab", qos="high",
                        extra=parse_slurm_args(["mem=0", "--exclusive-user=x", "constraint=ib"]))
    assert executor_parameters(opts, "vfmbench-a") == {
        "name": "vfmbench-a", "nodes": 2, "tasks_per_node": 1, "gpus_per_node": 8, "timeout_min": 600, "cpus_per_task": 64,
        "slurm_partition": "h100", "slurm_account": "lab", "slurm_qos": "high",
        "slurm_additional_parameters": {"mem": "0", "exclusive_user": "x", "constraint": "ib"},
    }
    assert set(executor_parameters(SlurmOptions(), "n")) == {"name", "nodes", "tasks_per_node", "gpus_per_node", "timeout_min"}


def test_job_checkpoint_requeues_a_fresh_copy(tmp_path):
    import pickle

    from vfmbench.launch import TorchrunJob

    job = TorchrunJob(["vfmbench.cli", "run"], 4, str(tmp_path / "run"), str(tmp_path))
    job._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    proc = job._proc
    delayed = job.checkpoint()
    assert proc.poll() is not None  # torchrun (here a sleeper) is stopped before the requeue
    again = delayed.function
    assert isinstance(again, TorchrunJob) and again is not job and again == job and again._proc is None
    assert pickle.loads(pickle.dumps(job)) == job


def test_resolved_config_reproduces_the_combination(tmp_path, host):
    from vfmbench.cli import resolve_run_config
    from vfmbench.runner import run_name
    from vfmbench.sweep import load_sweep, write_resolved_config

    sweep = write_sweep(tmp_path / "s.yaml", tmp_path / "runs", {"tokenizer": ["kl-vae", "vfm-vae"], "diffusion.train.lr": [3e-4]})
    preset, _, combos = load_sweep(host, sweep)
    for c in combos:
        path = write_resolved_config(c)
        cfg = resolve_run_config(host, preset, str(path), [], {k: None for k in ("tokenizer", "vfm", "decoder", "diffusion", "dataset", "out")})
        assert run_name(host, cfg) == c.name and cfg.tokenizer.name == c.combo["tokenizer.name"] and cfg.diffusion.train.lr == 3e-4
        assert Path(cfg.run.out).is_absolute() and Path(cfg.run.out) == c.run_dir.parent.resolve()


@pytest.mark.slow
def test_slurm_launcher_on_submitit_local_executor(tmp_path, monkeypatch):
    """Each combination is a submitit job running torchrun; a failing one is recorded with its job id."""
    from vfmbench.launch import SlurmOptions
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.sweep import run_sweep

    monkeypatch.chdir(ROOT)  # the job's torchrun runs `python -m vfmbench.cli` from the submitting folder
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "flaky")  # the jobs' --plugins-dir file is allow-listed
    out, plugins = tmp_path / "runs", write_plugin(tmp_path / "plugins", broken=True)
    sweep = write_sweep(tmp_path / "s.yaml", out, {"tokenizer": ["kl-vae", "flaky-vae"]})
    from vfmbench.cli import _load_plugins_dir

    host = get_plugin_manager(extra_plugins=_load_plugins_dir(plugins))
    opts = SlurmOptions(gpus_per_node=0, timeout_min=10, cluster="local")
    assert run_sweep(host, sweep, launcher="slurm", slurm=opts, plugins_dir=str(plugins)) == 1
    rows = status_rows(out)
    assert [r["status"] for r in rows] == ["submitted", "submitted", "ok", "failed"] or \
        [r["status"] for r in rows] == ["submitted", "submitted", "failed", "ok"]
    final = {r["run"]: r for r in rows[2:]}
    ok = next(r for r in final.values() if r["status"] == "ok")
    bad = next(r for r in final.values() if r["status"] == "failed")
    assert ok["job_id"] and ok["job_id"] == next(r["job_id"] for r in rows[:2] if r["run"] == ok["run"])
    assert (Path(ok["run_dir"]) / "results.jsonl").exists() and (Path(ok["run_dir"]) / "sweep-config.yaml").exists()
    err = Path(bad["error"]).read_text()
    assert "torchrun exited with code" in err and "deliberate failure in training" in err
    assert (out / "slurm" / bad["job_id"]).is_dir()
    # a re-run skips the finished combination and resubmits only the failed one
    assert run_sweep(host, sweep, launcher="slurm", slurm=opts, plugins_dir=str(plugins)) == 1
    again = status_rows(out)[len(rows):]
    assert sorted((r["run"], r["status"]) for r in again) == sorted([(ok["run"], "skipped"), (bad["run"], "submitted"), (bad["run"], "failed")])


class FakeJob:
    def __init__(self, job_id: str, state: str = "COMPLETED"):
        self.job_id, self.state = job_id, state

    def done(self):
        return True

    def result(self):
        return "ok"


def test_rerun_waits_for_a_job_still_queued_instead_of_resubmitting(tmp_path, host, monkeypatch):
    from vfmbench.launch import SlurmLauncher, SlurmOptions
    from vfmbench.sweep import append_status, load_sweep, run_sweep

    out = tmp_path / "runs"
    sweep = write_sweep(tmp_path / "s.yaml", out, {"tokenizer": ["kl-vae"]})
    _, _, (c,) = load_sweep(host, sweep)
    append_status(out, {"run": c.name, "status": "submitted", "job_id": "777"})
    attached = []
    monkeypatch.setattr(SlurmLauncher, "attach", lambda self, job_id: attached.append(job_id) or FakeJob(job_id))
    monkeypatch.setattr(SlurmLauncher, "submit", lambda self, job, name: pytest.fail("resubmitted a job that is still queued"))
    assert run_sweep(host, sweep, launcher="slurm", slurm=SlurmOptions(cluster="local")) == 0
    assert attached == ["777"]
    last = status_rows(out)[-1]
    assert last["status"] == "ok" and last["job_id"] == "777" and not (c.run_dir / "sweep-config.yaml").exists()


@pytest.mark.parametrize("state,active", [("RUNNING", True), ("PENDING", True), ("REQUEUED", True), ("COMPLETED", False),
                                          ("FAILED", False), ("CANCELLED by 12", False)])
def test_attach_only_to_queued_or_running_slurm_jobs(tmp_path, monkeypatch, state, active):
    import submitit.slurm.slurm as slurm_mod

    from vfmbench.launch import SlurmLauncher, SlurmOptions

    monkeypatch.setattr(slurm_mod, "SlurmJob", lambda folder, job_id: FakeJob(job_id, state))
    launcher = SlurmLauncher(tmp_path / "slurm", SlurmOptions())
    job = launcher.attach("55")
    assert (job is not None and job.job_id == "55") if active else job is None
    assert SlurmLauncher(tmp_path / "slurm", SlurmOptions(cluster="local")).attach("55") is None
