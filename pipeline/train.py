"""python -m pipeline.train --config configs/<recipe>.yaml [key=value ...]

Trains (or resumes) one run with DeepSpeed ZeRO. Start one process per GPU with the `deepspeed` launcher,
`torchrun` or Slurm's `srun` (see launch/); started alone it is a world of one. Overrides use dotted keys:
`train.zero_stage=3 optim.base_lr=5e-4 checkpoint.resume=none`.

The run, step by step (`TrainingJob.run`): set up (`Trainer`: loaders, step plan, resume point, whether
init_from applies) -> pull init_from's weights when it names a models:/ URI -> open the MLflow run -> train
(`Trainer.train`, pipeline/engine/trainer.py) -> end-of-run steps: export the final checkpoint (rank 0), log the
curves and metrics, register the model, close the MLflow run.

Expected failures (a bad config key, a missing or unfinalized shard set, ...) end in one line, `error: ...`,
printed by rank 0 only, and exit 2 (3 when the training diverged, 4 when another rank stopped answering or ended:
the line names it, pipeline/engine/watchdog.py; 74 when storage refused checkpoint.max_failed_saves saves in a row
or the final one, 73 when it refused a stop signal's save: the line names the step lost); `--debug` shows their
traceback. A save storage refuses (full, over quota, an I/O error) only warns: the run goes on and saves again at
the next interval.

SIGTERM or SIGUSR1 (scancel, preemption, Slurm's signal before the time limit, the launcher passing one on): every
rank finishes its optimizer step, the ranks agree to stop, save a checkpoint at that step, and exit 75; the
same command resumes there (pipeline/engine/stop.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# what start-up needs (the stop flag, --help, --check) is imported here: none of it imports torch, DeepSpeed or
# MLflow (tests/test_stop.py's import probe); the training and MLflow client modules are imported where a run
# starts (join_world, TrainingJob.run, start_tracking, finish_tracking)
from data_prep.shardset.manifest import read_manifest
from data_prep.shardset.reader import split_entries
from data_prep.shardset.store import open_store
from pipeline.config import RunConfig, load_config
from pipeline.engine.init_source import NAMED_PREFIXES
from pipeline.engine.init_source import check_init_source as check_init_path
from pipeline.engine.stop import EXIT_STOPPED, RunStopped, stop_flag, stop_if_agreed
from pipeline.engine.watchdog import (
    is_collective_failure,
    lost_rank_error,
    note_exiting,
    note_start,
    start_failure,
    start_watch,
)
from pipeline.tracking.params import flatten, manifest_params, package_versions
from pipeline.tracking.plots import training_curves
from pipeline.tracking.registry import ModelNotFound, pull_to_folder, register, registration_record, resolve_in_store
from pipeline.tracking.store import Store, StoreNotFound, absolute_location, resolve_store, ui_address
from swin_common.cli import ArgumentParser, CommandError, command, configure_logging, exit_process
from swin_common.redact import redact_text

if TYPE_CHECKING:  # they import torch
    from pipeline.engine.distributed import World
    from pipeline.engine.trainer import Trainer
    from pipeline.tracking.tracker import Tracker

log = logging.getLogger("pipeline.train")  # its __name__ is __main__ when run as a command
REPO = Path(__file__).resolve().parents[1]  # its configs/ are the recipes a relative --config may name


def parse_args(argv):
    p = ArgumentParser(
        prog="python -m pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    p.add_argument(
        "--launch-dir",
        help="where the job was launched: a relative out_dir (and --config) is taken "
        "from there (the launch scripts pass it; default: this process's folder)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the config, the shard set and an init_from path, "
        "then exit (the launch scripts do it before any rank starts)",
    )
    return p.parse_args(argv)


def local_path(value: str) -> bool:
    """Whether a config value names a local path (not empty, a URL such as s3://..., a models:/ URI or timm:NAME)."""
    return bool(value) and "://" not in value and not value.startswith(NAMED_PREFIXES)


def resolve_at_launch(cfg: RunConfig, launch_dir: str | None) -> Store:
    """Every relative path of the config (out_dir, data.shards, data.cache_dir, init_from, checkpoint.resume, a
    local MLflow store or artifact location; a recipe's own relative defaults too) becomes absolute once, against
    the folder the job was launched from, so every rank on every node names the same files whatever folder its
    launcher started it in (the launch scripts and the Slurm scripts change to the repository and pass
    --launch-dir; `python -m pipeline.train`, torchrun and accelerate run where they were started), and every
    "not found" names the absolute path it tried.

    The MLflow store is resolved here, once (pipeline.tracking.store.resolve_store: MLFLOW_TRACKING_URI, else
    tracking.uri, else the local store in out_dir) and returned, for the steps that use it to be handed; the
    config records it (tracking.uri) and the environment is not read again."""
    base = Path(launch_dir or os.getcwd())

    def absolute(value: str) -> str:  # as the user named it: `..` folded, symlinks kept
        return os.path.abspath(base / value) if local_path(value) and not Path(value).is_absolute() else value

    if not Path(cfg.out_dir).is_absolute():
        cfg.out_dir = str((base / cfg.out_dir).resolve())
    cfg.data.shards = absolute(cfg.data.shards)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.init_from = absolute(cfg.init_from)
    if cfg.checkpoint.resume not in ("auto", "none"):
        cfg.checkpoint.resume = absolute(cfg.checkpoint.resume)

    cfg.tracking.artifact_location = absolute_location(cfg.tracking.artifact_location, base)
    store = resolve_store(cfg.tracking.uri, cfg.out_dir, base, os.environ, cfg.tracking.artifact_location)
    cfg.tracking.uri = store.uri
    return store


def pull_init_source(init_from: str, store: Store) -> str:
    """`init_from=models:/NAME@ALIAS` (or /VERSION): the registered model pulled into the local model cache from
    `store`, the one this run tracks to; a path is returned as it is."""
    if not init_from.startswith("models:/"):
        return init_from

    return str(pull_to_folder(init_from, store=store))


def completed_run(cfg: RunConfig, trainer: Trainer) -> RunSummary | None:
    """The summary of a run whose every step is done: its newest checkpoint at its end step, exported from that
    checkpoint, and registered when the run registers. None when anything is owed (steps, the export, the
    registration after an outage or a stop): the run then goes on as usual."""
    if trainer.resume is None:
        return None
    from pipeline.engine.checkpoint import checkpoint_meta
    from pipeline.engine.model_export import exported_from

    step = checkpoint_meta(trainer.resume)["step"]
    model = cfg.run_dir / "model"
    if step < trainer.end or not exported_from(model, trainer.resume):
        return None
    record = registration_record(cfg.run_dir) if cfg.tracking.enabled and cfg.tracking.register else {}
    if record is None:
        return None
    return RunSummary(
        steps=step,
        schedule_steps=trainer.plan.total_steps,
        checkpoint=str(trainer.resume),
        run_dir=str(cfg.run_dir),
        model=str(model),
        complete=True,
        registered=record.get("registered"),
        aliases=record.get("aliases"),
    )


def check_before_launch(cfg: RunConfig, store: Store, alone: bool = False) -> None:
    """What a user can get wrong, found in about a second and before any rank starts (the config was parsed
    already): the shard set, init_from (a path's files from their headers; a models:/ URI's version or alias in
    the store, nothing downloaded) and an out_dir that cannot be created or written. Each is one line, exit 2.
    `alone`: no rank runs beside this process (--check), so folders made to try out_dir are removed again."""
    manifest = read_manifest(open_store(cfg.data.shards))  # its errors name the set: missing, a source, not finalized
    for split in filter(None, (cfg.data.train_split, cfg.data.val_split)):
        split_entries(manifest, cfg.data.shards, split)  # no such split, or no split index
    if cfg.init_from:
        check_init_source(cfg, store)
    check_writable(Path(cfg.out_dir), "out_dir", remove_made=alone)


def check_init_source(cfg: RunConfig, store: Store) -> None:
    """init_from resolves: a path holding what a run can start from (pipeline/engine/init_source.py), or a
    models:/ URI whose version or alias `store` holds (nothing downloaded)."""
    if cfg.init_from.startswith("models:/"):
        try:
            resolve_in_store(cfg.init_from, store)
        except (ModelNotFound, StoreNotFound) as e:
            said = str(e).removeprefix(f"{cfg.init_from}: ")
            raise CommandError(f"init_from={cfg.init_from}: {said}") from None
    else:
        check_init_path(cfg.init_from)


def check_writable(folder: Path, key: str, remove_made: bool) -> None:
    """`folder` can be created (if missing) and written: tried for real with a file made and removed (its name
    this host's and process's: ranks of several nodes may try one shared folder at once), since permission bits
    say nothing for root or on /proc, NFS or a full disk. `remove_made`: the folders made for the try are removed
    again (only where no other rank may be using them)."""
    made = []
    try:
        for parent in reversed([folder, *folder.parents]):
            if not parent.exists():
                parent.mkdir(exist_ok=True)
                made.append(parent)
        probe = folder / f".swin-write-check-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        what = "created" if not folder.is_dir() else "written (making a file in it failed"
        raise CommandError(
            f"{key}={folder}: cannot be {what}{': ' if folder.is_dir() else ' ('}{e.strerror or e}): give a folder "
            f"this job can write (on a file system every node mounts)"
        ) from None
    finally:
        for parent in reversed(made if remove_made else []):
            try:
                parent.rmdir()
            except OSError:
                break


def start_tracking(trainer: Trainer, store: Store) -> Tracker:
    """The MLflow run in `store` (rank 0 opens or reopens it; every rank gets its id)."""
    from pipeline.tracking.tracker import Tracker

    return Tracker(
        trainer.cfg, trainer.world, store, resumed=trainer.resume is not None, extra_params=run_params(trainer)
    )


def run_params(trainer: Trainer) -> dict:
    """What MLflow records beside the config (rank 0 only needs it)."""
    cfg, world, plan = trainer.cfg, trainer.world, trainer.plan
    if not world.is_main or not cfg.tracking.enabled:
        return {}
    from pipeline.engine.optim import deepspeed_config

    ds = deepspeed_config(cfg, plan, world.size, trainer.precision)
    return {
        **flatten(ds, "deepspeed."),
        **manifest_params(cfg.data.shards),
        **package_versions(),
        "precision": trainer.precision,
        "grad_accum": plan.grad_accum,
        "total_steps": plan.total_steps,
    }


def export_final(run_dir: Path, checkpoint: Path) -> Path:
    """Rank 0 consolidates the final checkpoint into <run>/model (model.safetensors + model.json)."""
    from pipeline.engine.model_export import export_checkpoint, exported_from

    out = run_dir / "model"
    if exported_from(out, checkpoint):  # a job stopped after the export: not done twice
        log.info("the export of %s is there already: %s", checkpoint, out)
        return out
    exported = export_checkpoint(checkpoint, out)
    log.info("exported %s", exported)
    return Path(exported)


def finish_tracking(cfg: RunConfig, tracker: Tracker, model: Path, version_tags: dict[str, str] | None = None) -> dict:
    """Curves and metrics (waited for up to tracking.final_timeout_s), then the model registered in this thread,
    however long its upload takes (Swin-L's export is ~790 MB), then the MLflow run's end. Returns what the
    summary says of the registration: {"registered": models:/NAME/VERSION, "aliases": [...]} (or {})."""
    curves = training_curves(cfg.run_dir / "metrics.jsonl", cfg.run_dir / "plots" / "training_curves.png")
    if curves:
        tracker.log_artifact(curves, "plots")
    tracker.log_artifact(cfg.run_dir / "metrics.jsonl")
    failure, registered = None, {}
    if cfg.tracking.register:
        if tracker.sender is None:
            if cfg.tracking.enabled:
                log.warning(
                    "this run is not tracked (MLflow was unreachable at its start), so its model is not "
                    "registered: `python -m pipeline.register %s` does it once the server runs",
                    cfg.run_dir,
                )
        else:
            tracker.flush(cfg.tracking.final_timeout_s)  # what was queued first goes first
            try:
                from pipeline.tracking.registry import record_registration

                version = register_final(cfg, tracker, model, version_tags)
                registered = record_registration(
                    cfg.run_dir, cfg.tracking.model_name or cfg.name, version, cfg.tracking.aliases
                )  # a rerun: nothing owed
            except Exception as e:  # noqa: BLE001  (the run's end is still recorded; the error follows)
                failure = e
    tracker.finish("FINISHED" if failure is None else "FAILED")
    if failure is not None:
        from pipeline.tracking.sender import short_error

        raise CommandError(
            f"the model was trained and exported to {model}, but registering it in "
            f"MLflow failed ({short_error(failure)}): retry with `python -m pipeline.register "
            f"{cfg.run_dir}`"
        ) from failure
    return registered


def version_run_tags(cfg: RunConfig, steps: int, planned: int) -> dict[str, str]:
    """What the registered version says of the run behind it: its steps, and, when train.max_steps cut it short
    of its schedule, that it did (a scratch run's model is not a finished one)."""
    tags = {"steps": str(steps), "schedule_steps": str(planned)}
    if steps < planned:
        tags["stopped_before_schedule_end"] = (
            f"train.max_steps={cfg.train.max_steps}: {steps} of the schedule's {planned} steps"
        )
    return tags


def register_final(cfg: RunConfig, tracker: Tracker, model_dir: Path, tags: dict[str, str] | None = None) -> str:
    """Registers the export as a new model version, logging progress while the upload runs."""
    sender, run_id = tracker.sender, tracker.run_id
    if sender is None or run_id is None:  # finish_tracking registers a tracked run's model only
        raise ValueError(f"{cfg.run_dir}: this run is not tracked in MLflow, so there is no run to register from")
    name = cfg.tracking.model_name or cfg.name
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    log.info("registering %s (%.0f MB) as a version of %s ...", model_dir, size / 1e6, name)
    t0, done = time.time(), threading.Event()

    def progress():
        while not done.wait(30):
            log.info("... still uploading %s to MLflow (%.0f s)", model_dir, time.time() - t0)

    threading.Thread(target=progress, name="register-progress", daemon=True).start()
    try:
        version = register(sender.client, run_id, model_dir, name, list(cfg.tracking.aliases), tags)
    finally:
        done.set()
    log.info("registered models:/%s/%s in %.0f s", name, version, time.time() - t0)
    return version


@dataclass
class RunSummary:
    """What rank 0 prints at the end (one JSON object; fields without a value are left out, except mlflow_run
    of a run that trained, null when it was not tracked)."""

    steps: int
    schedule_steps: int
    checkpoint: str
    run_dir: str
    complete: bool | None = None  # it was complete at the start: nothing was done
    dropped_micro_batches: int | None = None
    eval: dict | None = None
    time: dict | None = None
    model: str | None = None
    registered: str | None = None  # models:/NAME/VERSION
    aliases: list[str] | None = None
    seconds: float | None = None
    mlflow_run: str | None = None
    mlflow_ui: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or (k == "mlflow_run" and not self.complete)}


class TrainingJob:
    """What `python -m pipeline.train` does once the world is up: set up, train, then the end-of-run steps. Its
    MLflow run is open (`tracker`) from before the first step until the run's end is recorded, so that the
    command's one failure handler can end it."""

    def __init__(self, cfg: RunConfig, world: World, store: Store):
        self.cfg, self.world, self.store = cfg, world, store
        self.tracker: Tracker | None = None
        self.started = time.time()

    def run(self) -> RunSummary:
        """Set up, train, export and register; the summary rank 0 prints."""
        from pipeline.engine.distributed import broadcast_object, wait_for_main
        from pipeline.engine.trainer import Trainer

        cfg, world = self.cfg, self.world
        trainer = Trainer(cfg, world)
        if trainer.resume is not None and cfg.init_from:
            check_init_source(cfg, self.store)  # not applied, but a typo is still an error
            if world.is_main:
                log.info(
                    "resuming from %s: init_from=%s is not applied (it initialises a new run; a new name or "
                    "out_dir starts from it)",
                    trainer.resume,
                    redact_text(cfg.init_from),
                )
        summary = completed_run(cfg, trainer)
        if summary is not None:  # every rank reads the same files: all leave here, or none
            if world.is_main:
                log.info(
                    "run %s is complete at step %d of %d (model %s%s): nothing to do. To train further raise "
                    "train.max_steps or schedule.epochs; to start over give another name or out_dir",
                    cfg.run_dir,
                    summary.steps,
                    summary.schedule_steps,
                    summary.model,
                    f", registered as {summary.registered}" if summary.registered else "",
                )
            summary.seconds = self._seconds()
            return summary
        init_path = pull_init_source(trainer.init_from, self.store)
        # the summary names the run's MLflow run, which rank 0 ends below (self.tracker: while it is open)
        tracker = self.tracker = start_tracking(trainer, self.store)
        result = trainer.train(init_path, tracker)
        stop_if_agreed(result.steps, "before the export")
        summary = RunSummary(
            steps=result.steps,
            schedule_steps=result.schedule_steps,
            checkpoint=str(result.checkpoint),
            run_dir=str(cfg.run_dir),
            dropped_micro_batches=result.dropped_micro_batches,
            eval=result.eval,
            time=result.time,
        )
        failure, stopped = None, None
        if world.is_main:
            summary.model = str(export_final(cfg.run_dir, result.checkpoint))
            signal_name = stop_flag().signal_name  # None until a stop signal is received
            if signal_name is not None:  # the export is kept; registering it is left to the resumed job
                stopped = RunStopped(signal_name, result.steps, "after the export")
            else:
                self.tracker = None  # finish_tracking ends the MLflow run, whatever happens
                try:
                    record = finish_tracking(
                        cfg, tracker, Path(summary.model), version_run_tags(cfg, result.steps, result.schedule_steps)
                    )
                    summary.registered, summary.aliases = record.get("registered"), record.get("aliases")
                except Exception as e:  # noqa: BLE001  (raised once every rank is past the wait)
                    failure = e
        wait_for_main("the export and registration")
        stopped = broadcast_object(stopped)
        if stopped is not None:
            raise stopped
        if failure is not None:
            raise failure
        self.tracker = None
        summary.mlflow_run, summary.seconds = tracker.run_id, self._seconds()
        if tracker.run_id:
            summary.mlflow_ui = ui_command(self.store, tracker.experiment_id)
        return summary

    def stopped(self, stop: RunStopped) -> None:
        """A stop signal ended the run at a checkpoint: its MLflow run, when open, records it."""
        if self.tracker is not None:
            self.tracker.stopped(stop)
            self.tracker = None

    def failed(self, e: BaseException) -> None:
        """The run ends with an error: its MLflow run, when open, records it (the rank's name for a lost rank, not
        the transport's words), and a run that never reached its first step leaves no folder behind."""
        if self.tracker is not None:
            self.tracker.failed(e)
            self.tracker = None
        if self.world.is_main:
            from pipeline.engine.run_files import discard_unstarted_run

            discard_unstarted_run(self.cfg.run_dir, self.world.size, also=(MLFLOW_RUN_RECORD,))

    def _seconds(self) -> float:
        return round(time.time() - self.started, 1)


MLFLOW_RUN_RECORD = "mlflow_run.json"  # the tracker's record of the run's MLflow run (pipeline/tracking/tracker.py)


def ui_command(store: Store, experiment_id: str | None) -> str:
    """Where to look at the run: the server's page of its experiment in the model-training view, or for a local
    store the `mlflow ui` command and that page on it."""
    return ui_address(store, experiment_id)


def report_stop(cfg: RunConfig, stop: RunStopped) -> None:
    """Rank 0's line on a stop, and the stop record a launch script asked for in SWIN_STOP_FILE: the script's
    proof that every rank stopped at a checkpoint (a launcher may report another status, e.g. srun's when it
    kills the other tasks on their way out after rank 0's exit 75)."""
    from pipeline.engine.checkpoint import complete_checkpoints

    newest = complete_checkpoints(cfg.run_dir / "checkpoints")
    print(
        f"stopped by {stop}: checkpoint {newest[-1] if newest else '(none)'}; run the same command to resume "
        f"(exit {EXIT_STOPPED})",
        file=sys.stderr,
        flush=True,
    )
    record = os.environ.get("SWIN_STOP_FILE")
    if record:
        Path(record).write_text(
            json.dumps(
                {
                    "signal": stop.signal_name,
                    "step": stop.step,
                    "during": stop.during,
                    "checkpoint": str(newest[-1]) if newest else None,
                }
            )
            + "\n"
        )


def load_run_config(args: argparse.Namespace) -> tuple[RunConfig, Store]:
    """The run's config: --config (a relative one is the launch folder's, failing that a recipe of this
    repository) with the overrides, every relative path made absolute against the launch folder; and its MLflow
    store, resolved once."""
    config = Path(args.config)
    looked = (
        [config]
        if config.is_absolute()
        else list(dict.fromkeys(Path(os.path.abspath(base / config)) for base in (Path(args.launch_dir or "."), REPO)))
    )
    found = next((path for path in looked if path.is_file()), None)
    if found is None:
        raise CommandError(
            f"config file not found: {args.config} (looked for {' and '.join(map(str, looked))}): "
            f"give a recipe of configs/, e.g. --config configs/tiny_22k.yaml"
        )
    cfg = load_config(found, args.overrides)
    store = resolve_at_launch(cfg, args.launch_dir)
    return cfg, store


def join_world(cfg: RunConfig) -> World:
    """This rank in the job's process group (a world of one when started alone), logging configured; a
    rendezvous that timed out names the ranks that never came."""
    from pipeline.engine.distributed import init_distributed

    started = note_start(cfg.run_dir, dict(os.environ))  # a rank that never starts is then named
    try:
        world = init_distributed(
            cfg.train.collective_timeout_s, cfg.train.long_wait_timeout_s, str(cfg.run_dir / "nccl_traces")
        )
    except Exception as e:
        failure = start_failure(e, cfg.run_dir, dict(os.environ), started, cfg.train.collective_timeout_s)
        if failure is e:
            raise
        raise failure from e
    configure_logging(
        level=logging.INFO if world.is_main else logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s [rank {world.rank}] %(name)s %(levelname)s %(message)s",
    )
    return world


@command(ranked=True)
def main(argv: list[str] | None = None) -> int:
    # first: a stop signal from here on only sets the flag, and the run stops at its first step boundary; Slurm's
    # time-limit SIGUSR1 may come in the first seconds of a job (up to 60 s early), and before this line it kills
    # the task (the Slurm script requeues such a job: launch/slurm/pretrain_22k.sbatch)
    stop_flag().install()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():  # a job's log: DeepSpeed's checkpoint readers' bars would be one long line each
        os.environ.setdefault("TQDM_DISABLE", "1")
    cfg, store = load_run_config(args)
    # a user's error in a second, before torch and the process group; `alone`: the launch scripts' own check
    alone = args.check and args.local_rank is None and not any(k in os.environ for k in ("RANK", "SLURM_STEP_ID"))
    check_before_launch(cfg, store, alone=alone)
    if args.check:
        return 0
    world = join_world(cfg)
    from pipeline.engine.distributed import shutdown

    watch, job = None, TrainingJob(cfg, world, store)
    try:
        if world.size > 1:
            watch = start_watch(cfg.run_dir, world.rank)  # a rank that ends or hangs ends the job, named
        summary = job.run()
        stop_flag().run_complete()
    except RunStopped as stop:
        job.stopped(stop)
        if world.is_main:
            report_stop(cfg, stop)
        if watch is not None:
            watch.done()
        shutdown()
        return EXIT_STOPPED
    except BaseException as e:
        # on its way out with an error: a launcher's SIGTERM ends it at once again, and the process group stays
        # up for the error report, which compares the ranks' lines through its store (swin_common.cli); its
        # watchdog lets it finish the report
        stop_flag().uninstall()
        note_exiting()
        lost = as_lost_rank(e, cfg, world)
        job.failed(lost or e)
        if lost is not None:
            raise lost from e
        raise
    if world.is_main:
        print(redact_text(json.dumps(summary.as_dict(), indent=1)), flush=True)
    if watch is not None:
        watch.done()
    shutdown()
    return 0


def as_lost_rank(e: BaseException, cfg: RunConfig, world: World) -> RankLost | None:
    """A collective's failure (a timeout, a peer gone) in a job of several ranks, as the error that names the
    rank that stopped answering; None for anything else."""
    if world.size < 2 or isinstance(e, RankLost) or not is_collective_failure(e):
        return None
    return RankLost(lost_rank_error(cfg.run_dir, world.rank, world.size, cfg.train.collective_timeout_s, e))


class RankLost(CommandError):
    """Another rank stopped answering or ended: named, exit 4. The process leaves at once after its line
    (os._exit): the transport's threads, whose peer is gone, would abort the interpreter's own exit."""

    hard_exit = True

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_RANK_LOST)


EXIT_RANK_LOST = 4


if __name__ == "__main__":
    exit_process(main())
