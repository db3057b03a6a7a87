"""python -m pipeline.train --config configs/<recipe>.yaml [key=value ...]

Trains (or resumes) one run with DeepSpeed ZeRO. Start one process per GPU with the `deepspeed` launcher,
`torchrun` or Slurm's `srun` (see launch/); started alone it is a world of one. Overrides use dotted keys:
`train.zero_stage=3 optim.base_lr=5e-4 checkpoint.resume=none`.

The run, step by step: set up (loaders, step plan, resume point, the init_from weights pulled from the
registry when it names a models:/ URI) -> open the MLflow run -> train (the loop in
pipeline/engine/loop.py) -> end-of-run steps: export the final checkpoint (rank 0), log the curves and metrics,
register the model, close the MLflow run.

Expected failures (a bad config key, a missing or unfinalized shard set, ...) end in one line, `error: ...`,
printed by rank 0 only, and exit 2 (3 when the training diverged); `--debug` shows their traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from swin_common.cli import ArgumentParser, command, configure_logging
from swin_common.redact import redact_text

log = logging.getLogger("pipeline.train")


def parse_args(argv):
    p = ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def pull_init_source(init_from: str) -> str:
    """`init_from=models:/NAME@ALIAS` (or /VERSION): the registered model pulled into the local model cache; a
    path is returned as it is."""
    if not init_from.startswith("models:/"):
        return init_from
    from pipeline.tracking.registry import pull_to_folder

    return str(pull_to_folder(init_from))


def start_tracking(setup):
    """The MLflow run (rank 0 opens or reopens it; every rank gets its id)."""
    from pipeline.tracking.tracker import Tracker

    return Tracker(setup.cfg, setup.world, resumed=setup.resume is not None, extra_params=run_params(setup))


def run_params(setup) -> dict:
    """What MLflow records beside the config (rank 0 only needs it)."""
    cfg, world, plan = setup.cfg, setup.world, setup.plan
    if not world.is_main or not cfg.tracking.enabled:
        return {}
    from pipeline.engine.optim import deepspeed_config
    from pipeline.tracking.tracker import flatten, manifest_params, package_versions

    ds = deepspeed_config(cfg, plan, world.size, setup.precision)
    return {**flatten(ds, "deepspeed."), **manifest_params(cfg.data.shards), **package_versions(),
            "precision": setup.precision, "grad_accum": plan.grad_accum, "total_steps": plan.total_steps}


def export_final(setup, summary: dict) -> dict:
    """Rank 0 consolidates the final checkpoint into <run>/model (model.safetensors + model.json)."""
    from pipeline.engine.model_export import export_checkpoint

    exported = export_checkpoint(summary["checkpoint"], setup.cfg.run_dir / "model")
    log.info("exported %s", exported)
    return {**summary, "model": str(exported)}


def finish_tracking(setup, tracker, summary: dict) -> None:
    """Curves, metrics and (when asked) the registered model version, then the MLflow run's end."""
    from pipeline.tracking.plots import training_curves
    from pipeline.tracking.registry import register

    cfg = setup.cfg
    curves = training_curves(cfg.run_dir / "metrics.jsonl", cfg.run_dir / "plots" / "training_curves.png")
    if curves:
        tracker.log_artifact(curves, "plots")
    tracker.log_artifact(cfg.run_dir / "metrics.jsonl")
    if cfg.tracking.register and summary.get("model") and tracker.sender is not None:
        name = cfg.tracking.model_name or cfg.name
        tracker.call(register, tracker.sender.client, tracker.run_id, Path(summary["model"]), name,
                     list(cfg.tracking.aliases))
    tracker.finish()


def run(cfg, world) -> dict:
    """Set up, train, then the end-of-run steps; the summary rank 0 prints."""
    from pipeline.engine.distributed import barrier
    from pipeline.engine.loop import prepare, train

    t_start = time.time()
    setup = prepare(cfg, world)
    setup.init_path = pull_init_source(setup.init_path)
    tracker = start_tracking(setup)
    try:
        summary = train(setup, tracker)
    except BaseException:
        tracker.finish("FAILED" if world.is_main else "KILLED")
        raise
    if world.is_main:
        summary = export_final(setup, summary)
        finish_tracking(setup, tracker, summary)
    barrier()
    return {**summary, "seconds": time.time() - t_start, "mlflow_run": tracker.run_id}


@command(exit_codes={"TrainingDiverged": 3}, ranked=True)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pipeline.engine.distributed import init_distributed, shutdown

    world = init_distributed()
    configure_logging(level=logging.INFO if world.is_main else logging.WARNING, stream=sys.stderr,
                      format=f"%(asctime)s [rank {world.rank}] %(name)s %(levelname)s %(message)s")
    try:
        summary = run(cfg, world)
        if world.is_main:
            print(redact_text(json.dumps(summary, indent=1)), flush=True)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
