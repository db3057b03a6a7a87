"""What the tests of training runs share: the tiny recipe made smaller, the environment of a launch outside any
job, running a command, and reading a run's records (metrics.jsonl, the summary a run prints, its checkpoints'
COMPLETE markers, the ranks' heartbeats).

The servers the runs talk to (MLflow, S3, Slurm, sshd) are tests/servers.py's; registry stores tests/stores.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from servers import REPO, free_port

LAUNCH = REPO / "launch" / "pretrain_22k.sh"
TINY = REPO / "configs" / "tiny_22k.yaml"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
ACCELERATE = Path(sys.executable).with_name("accelerate")

# The tiny recipe, smaller: 16 images per rank per step (two ranks: a global batch of 32), a two-epoch schedule
# without warm-up, a record at every step. Untracked unless a test turns MLflow on: MLflow's part of a run is
# tests/test_tracking.py's, and a local store costs each launch ~2.5 s here.
SMALL = (
    "train.global_batch=32",
    "train.micro_batch=16",
    "eval.batch_size=50",
    "data.workers=1",
    "train.log_every=1",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
)
UNTRACKED = ("tracking.enabled=false",)


def small(
    shards: Path, out: Path, name: str, *extra: str, config: str | Path = TINY, tracked: bool = False
) -> list[str]:
    """The arguments of a small run of the tiny recipe (`config`: as a user names it, e.g. a relative path)."""
    return [
        "--config",
        str(config),
        f"name={name}",
        f"out_dir={out}",
        f"data.shards={shards}",
        *SMALL,
        *(() if tracked else UNTRACKED),
        *extra,
    ]


SBATCH = REPO / "launch" / "slurm" / "pretrain_22k.sbatch"


def one_node_two_tasks(log_dir: Path, *extra: str) -> list[str]:
    """sbatch options of a small CPU job on the test cluster: one node, two ranks, its log in log_dir."""
    return [
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        f"--output={log_dir}/job-%j.out",
        *extra,
    ]


def sbatch_env(python: str | Path = sys.executable) -> dict[str, str]:
    """What the sbatch script is told: the python to run and the repository."""
    return {"PYTHON": str(python), "SWIN_REPO": str(REPO)}


def job_env(port: bool = True, **extra: str) -> dict[str, str]:
    """This environment as outside any job (no rank, rendezvous, Slurm or accelerate variables), the venv's python
    for the launch scripts, a free rendezvous port (`port`; a launcher given its own leaves it out), plus extra."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(("SLURM_", "ACCELERATE_"))
    }
    return {**base, "PYTHON": sys.executable, **({"MASTER_PORT": str(free_port())} if port else {}), **extra}


def run(cmd: list, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """`cmd` run from the repository in a job-free environment (or `env`); with `check`, its output on failure."""
    proc = subprocess.run(
        list(map(str, cmd)),
        cwd=kw.pop("cwd", REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", None) or job_env(),
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def records(run_dir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl, in order ([] before its first)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The run's training records and its evaluation records."""
    lines = records(run_dir)
    return [m for m in lines if "loss" in m], [m for m in lines if "val_top1" in m]


def run_summary(stdout: str) -> dict:
    """The train command's closing JSON (rank 0's stdout; the launcher's own lines around it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.rstrip() == "{")
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip() == "}")
    return json.loads("\n".join(lines[start : end + 1]))


def checkpoint_record(checkpoint: Path) -> dict:
    """What a checkpoint's COMPLETE marker records (step, world_size, zero_stage, global_batch, micro_batch, ...)."""
    return json.loads((checkpoint / "COMPLETE").read_text())


def newest_complete(run_dir: Path) -> Path:
    """The run's newest complete checkpoint."""
    return max(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())


def rank_records(run_dir: Path, kind: str = "json") -> dict[int, dict]:
    """The run's records of one kind per rank, as pipeline/engine/watchdog.py writes them in <run>/ranks: `json`,
    the heartbeats (host, address: the node as its launcher reached it, pid, step), or `lost`, a rank whose process
    ended without a clean end (its watchdog's record). A job's start clears those of the job before."""
    found = {}
    for path in (run_dir / "ranks").glob(f"rank_*.{kind}"):
        record = json.loads(path.read_text())
        found[record["rank"]] = record
    return found
