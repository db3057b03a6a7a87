"""The records a training run writes in its run folder as it goes, and their readers.

The run folder's records a training run writes as it goes, each with its reader beside its writer:
`metrics.jsonl` (one JSON line per log, evaluation or stop event), `resumes.jsonl` (what each elastic resume
did), and the files a run's start writes, which a run that fails before its first step takes away again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pipeline.engine.checkpoint import SHARED_RUN_DIR_FILES, complete_checkpoints
from pipeline.engine.distributed import World

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
INIT_FILES = ("init.json", "head_map.json")  # what the weights a fresh run starts from were, and its head map
RESUMES_FILE = "resumes.jsonl"


class MetricsLog:
    """Rank 0's log of the run's records: metrics.jsonl, a short line each, and MLflow.

    Rank 0 appends one JSON line per log/eval event to <run>/metrics.jsonl, prints a short line and hands
    the values to MLflow (at the record's step)."""

    def __init__(self, run_dir: Path, enabled: bool, tracker=None):
        self.path, self.enabled, self.tracker = run_dir / METRICS_FILE, enabled, tracker  # tracker: has log_metrics

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(" ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "time"))
        if self.tracker is not None:
            self.tracker.log_metrics(
                record["step"], {k: v for k, v in record.items() if k not in ("step", "time", "epoch")}
            )

    def evaluation_at(self, step: int) -> dict:
        """The evaluation recorded at `step` (a job stopped after it, e.g. during the export), else {}."""
        if not self.path.is_file():
            return {}
        found = {}
        for line in self.path.read_text().splitlines():
            record = json.loads(line) if '"val_top1"' in line else {}
            if record.get("step") == step:
                found = {k: v for k, v in record.items() if k not in ("eval_s", "time")}
        return found


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def record_elastic_resume(engine, run_dir: Path, world: World, resumed: dict, loader) -> None:
    """Rank 0 appends a record of what an elastic resume did to <run>/resumes.jsonl.

    Rank 0 appends what an elastic resume did to <run>/resumes.jsonl: the step, the world sizes, the LR the
    schedule gives, each optimizer group's weight decay, where the data resumes, and a fingerprint of the fp32
    master weights (per parameter: sum and sum of squares), to compare with the checkpoint it came from."""
    fingerprint = fp32_fingerprint(engine)  # a collective under ZeRO-3: every rank takes part
    if world.is_main:
        record = {
            **resumed,
            "lr": engine.get_lr()[0],
            "loader_epoch": loader.epoch,
            "consumed": loader.consumed(),
            "fp32_fingerprint": fingerprint,
            "time": time.time(),
        }
        with open(run_dir / RESUMES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def fp32_fingerprint(engine) -> dict[str, list[float]]:
    """Per parameter, the fingerprint of its full fp32 master copy (gathered under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param  # deepspeed's import costs seconds; only elastic resumes

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = tensor_fingerprint(param.detach() if full is None else full)
    return out


def tensor_fingerprint(t: torch.Tensor) -> list[float]:
    """A fingerprint of a tensor's values that is the same whatever the threads or ranks.

    [sum, sum of squares] in float64, summed by numpy (pairwise, one thread: one fixed order), so the same
    weights give the same numbers whatever the threads or ranks at work (torch's parallel sum changes its order
    with the thread count). One float64 copy of the tensor at a time: cheap next to a resume, even for Swin-L."""
    values = t.detach().to("cpu", torch.float64).numpy().ravel()
    return [float(values.sum()), float((values * values).sum())]


def discard_unstarted_run(run_dir: Path, world_size: int, also: tuple[str, ...] = ()) -> bool:
    """Removes what a run that failed before its first step left; whether its folder went.

    Rank 0, on a failure: a run that never reached its first step (no checkpoint, nothing in metrics.jsonl)
    leaves nothing behind. The files its start wrote (`also`: those of the layers above the engine, such as the
    MLflow run's record) are removed, then the folder when nothing else is in it. In a job of several ranks,
    ranks/ stays: the watchdogs of the other ranks still write there on their way out (which rank ended), and an
    error line may point to it. Returns whether the folder was removed."""
    metrics = run_dir / METRICS_FILE
    if (
        not run_dir.is_dir()
        or complete_checkpoints(run_dir / "checkpoints")
        or (metrics.is_file() and metrics.stat().st_size)
    ):
        return False
    for name in (CONFIG_FILE, *SHARED_RUN_DIR_FILES, *INIT_FILES, METRICS_FILE, *also):
        (run_dir / name).unlink(missing_ok=True)
    folders = ["checkpoints", "nccl_traces", *(["ranks/start", "ranks"] if world_size == 1 else [])]
    for folder in [*(run_dir / name for name in folders), run_dir]:
        try:
            folder.rmdir()  # only when empty: what the user (or a tool) put there stays
        except OSError:
            pass
    return not run_dir.exists()
