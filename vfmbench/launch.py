"""The Slurm launcher of ``vfmbench sweep --launcher slurm``: one submitit job per combination.

Each job runs ``torchrun`` on every node of its allocation (one submitit task per node), with the
rendezvous on the allocation's first node, and torchrun starts ``python -m vfmbench.cli run
--preset P --config <run dir>/sweep-config.yaml`` (the combination's fully resolved config), so the
job computes exactly what the local launcher would. On preemption or timeout, submitit calls
``TorchrunJob.checkpoint`` and requeues the job; the requeued run resumes from its stages'
checkpoints. submitit is an optional extra (``pip install 'vfmbench[slurm]'``), imported only here.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

# Slurm states of a job that is still queued or running (a re-run waits for it instead of resubmitting).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
ERROR_TAIL_LINES = 200


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'vfmbench[slurm]'") from None
    return submitit


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks Slurm for; ``cluster`` is submitit's executor ('slurm', or 'local'/'debug' in tests)."""

    partition: str = ""
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 0  # 0 = Slurm's default
    timeout_min: int = 24 * 60
    account: str = ""
    qos: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # --slurm-arg key=value -> #SBATCH --key=value
    cluster: str = "slurm"

    def __post_init__(self) -> None:
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "cpus_per_task"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    """``--slurm-arg key=value`` items -> submitit's ``slurm_additional_parameters``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise UserError(f"--slurm-arg {item!r}: expected key=value with an sbatch option name, e.g. --slurm-arg mem=200G")
        out[key] = value.strip()
    return out


def executor_parameters(opts: SlurmOptions, name: str) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` keywords of one job: one task per node (each runs torchrun)."""
    params: dict[str, Any] = {
        "name": name,
        "nodes": opts.nodes,
        "tasks_per_node": 1,
        "gpus_per_node": opts.gpus_per_node,
        "timeout_min": opts.timeout_min,
    }
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.account:
        params["slurm_account"] = opts.account
    if opts.qos:
        params["slurm_qos"] = opts.qos
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    return params


# ------------------------------------------------------------------------------------------------
# inside the job


@dataclass(frozen=True)
class Allocation:
    """Where one task of a job runs: the allocation's nodes, this node's index, the job id."""

    num_nodes: int
    node_rank: int
    hostnames: tuple[str, ...]
    job_id: str

    @classmethod
    def from_job_environment(cls, env: Any) -> "Allocation":
        """From a ``submitit.JobEnvironment`` (SLURM_JOB_NODELIST, SLURM_NODEID, ... on Slurm)."""
        return cls(num_nodes=int(env.num_nodes), node_rank=int(env.node), hostnames=tuple(env.hostnames), job_id=str(env.job_id))

    @property
    def master(self) -> str:
        return self.hostnames[0]

    @property
    def port(self) -> int:
        """A rendezvous port derived from the job id, so that two jobs sharing a first node do not collide."""
        digits = re.sub(r"\D", "", self.job_id) or "0"
        return 29500 + int(digits) % 20000


def torchrun_command(alloc: Allocation, nproc_per_node: int, module_args: list[str], python: str | None = None) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) for this node of the allocation."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nnodes={alloc.num_nodes}", f"--nproc-per-node={max(1, nproc_per_node)}"]
    if alloc.num_nodes == 1:
        cmd.append("--standalone")
    else:
        # c10d: the store lives on the first node; ranks are assigned as the nodes join
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={alloc.master}:{alloc.port}", f"--rdzv-id={alloc.job_id}"]
    return cmd + ["--max-restarts=0", "-m", *module_args]


def run_module_args(config_file: Path, preset: str, plugins_dir: str | None = None) -> list[str]:
    """``vfmbench.cli run`` on a resolved config: the preset first, then the file (which repeats and
    extends it), so the job's config is exactly the combination's."""
    args = ["vfmbench.cli"]
    if plugins_dir:
        args += ["--plugins-dir", str(Path(plugins_dir).resolve())]
    return args + ["run", "--preset", preset, "--config", str(config_file)]


@dataclass
class TorchrunJob:
    """A submitit job: run torchrun on this node, write the run's error.txt if it fails.

    ``checkpoint`` (submitit's requeue protocol) stops torchrun and returns a fresh copy of the
    job; the requeued job re-runs the same command, which resumes from the stages' checkpoints."""

    module_args: list[str]
    nproc_per_node: int
    run_dir: str
    cwd: str
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def __call__(self) -> str:
        submitit = import_submitit()
        env = submitit.JobEnvironment()
        alloc = Allocation.from_job_environment(env)
        cmd = torchrun_command(alloc, self.nproc_per_node, self.module_args)
        print(f"[vfmbench] node {alloc.node_rank}/{alloc.num_nodes} of job {alloc.job_id}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        self._proc = subprocess.Popen(cmd, cwd=self.cwd, start_new_session=True)
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            if env.global_rank == 0:
                self._write_error(rc, cmd, getattr(env.paths, "stderr", None))
            raise RuntimeError(f"torchrun exited with code {rc} on node {alloc.node_rank} of job {alloc.job_id}; "
                               f"see {Path(self.run_dir) / 'error.txt'}")
        return self.run_dir

    def _write_error(self, rc: int, cmd: list[str], log: Path | None) -> None:
        from .checkpoint import write_text

        tail = ""
        if log is not None and Path(log).is_file():
            lines = Path(log).read_text(errors="replace").splitlines()
            tail = "\n".join(lines[-ERROR_TAIL_LINES:])
        write_text(Path(self.run_dir) / "error.txt",
                   f"torchrun exited with code {rc}\ncommand: {' '.join(cmd)}\njob log: {log}\n\n"
                   f"last {ERROR_TAIL_LINES} lines of the job log:\n{tail}\n")

    def checkpoint(self, *args: Any, **kwargs: Any):
        self.stop()
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TorchrunJob(list(self.module_args), self.nproc_per_node, self.run_dir, self.cwd))

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM torchrun's process group, then SIGKILL after ``grace_s``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a process handle does not travel in the job pickle
        return state


# ------------------------------------------------------------------------------------------------
# on the submitting machine


class SlurmLauncher:
    """Submits TorchrunJobs through a submitit executor; logs go to ``<folder>/%j``."""

    def __init__(self, folder: Path, opts: SlurmOptions):
        self.submitit = import_submitit()
        self.folder = Path(folder)
        self.opts = opts

    def submit(self, job: TorchrunJob, name: str):
        executor = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.opts.cluster)
        executor.update_parameters(**executor_parameters(self.opts, name))
        return executor.submit(job)

    def attach(self, job_id: str):
        """The job ``job_id`` of an earlier invocation if Slurm still has it queued or running, else None."""
        if self.opts.cluster != "slurm" or not job_id:
            return None
        from submitit.slurm.slurm import SlurmJob

        job = SlurmJob(folder=str(self.folder / "%j"), job_id=job_id)
        try:
            state = job.state.split()[0].upper()
        except Exception:  # noqa: BLE001 - sacct unavailable: treat as gone, the combination is resubmitted
            return None
        return job if state in ACTIVE_STATES else None

    def wait(self, jobs: dict[Any, Any], on_done, poll_s: float | None = None) -> None:
        """Call ``on_done(key, job, error_text_or_None)`` for each job as it finishes."""
        poll_s = poll_s if poll_s is not None else (30.0 if self.opts.cluster == "slurm" else 1.0)
        pending = dict(jobs)
        while pending:
            for key, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[key]
                try:
                    job.result()
                    error = None
                except Exception as e:  # noqa: BLE001 - a failed job is recorded, the others are awaited
                    error = f"{type(e).__name__}: {e}"
                on_done(key, job, error)
            if pending:
                time.sleep(poll_s)
