"""One training run, read top-down: `Trainer(cfg, world)` sets it up, `Trainer.train()` runs it to its end step.

Set-up (the constructor): the run's folder and config dump, the loaders, the step plan and the step the run ends
at, the checkpoint to resume (`checkpoint.resume: auto`) and whether `init_from` applies (a fresh run only).
`train()` builds the DeepSpeed engine (from init_from's weights, or to be overwritten by the checkpoint), resumes,
then repeats data -> forward/backward -> optimizer step -> log -> evaluate -> checkpoint until the end step, and
leaves a final checkpoint. Exporting, curves, registration and the MLflow run's end are end-of-run steps of
`python -m pipeline.train` (pipeline/train.py).

A stop signal (pipeline/engine/stop.py) is agreed on after every optimizer step and between evaluation batches;
the run then saves a checkpoint at the step it reached (unless one is there already) and raises RunStopped.

The checkpoint it resumes from has passed its check (pipeline/engine/checkpoint.py: find_resume); one that then
fails to load on any rank is set aside like a damaged one and the next one is tried, every rank alike. A save that
storage refuses (full, over quota, an I/O error) costs a warning and a record, and the run goes on to the next
interval; checkpoint.max_failed_saves in a row end it (SavesFailing, exit 74), as does a refused final save; a stop
whose save is refused ends it with StopNotSaved (exit 73), naming the step lost.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
from timm.scheduler.scheduler import Scheduler

from data_prep.shardset.layout import write_map
from pipeline.config import RunConfig, dump_config
from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.engine.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    Damage,
    SaveFailed,
    check_shared_run_dir,
    checkpoint_meta,
    complete_checkpoints,
    find_resume,
    free_text,
    load_checkpoint,
    needs_universal,
    save_checkpoint,
    set_aside,
)
from pipeline.engine.distributed import World, all_gather_object, all_reduce_sum, all_true, barrier, broadcast_object
from pipeline.engine.model_export import load_source
from pipeline.engine.optim import (
    StepPlan,
    create_optimizer,
    create_schedule,
    deepspeed_config,
    deepspeed_skips_nonfinite,
    loss_scale,
    plan_steps,
    resolve_precision,
    skipped_steps,
)
from pipeline.engine.run_files import CONFIG_FILE, INIT_FILES, MetricsLog, record_elastic_resume
from pipeline.engine.step import StepTally, micro_step
from pipeline.engine.stop import RunStopped, stop_flag, stop_if_agreed
from pipeline.engine.timing import RunClock, run_summary, s3_fields, summary_line, window_fields
from pipeline.engine.validation import evaluate
from pipeline.engine.watchdog import at_step
from pipeline.model import create_model, forward_flops
from pipeline.model.transfer import initialise
from swin_common.errors import UserError
from swin_common.gpu import current_gpu, memory_fields, mfu, peak_flops
from swin_common.redact import redact_text

log = logging.getLogger(__name__)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class TrainingDiverged(UserError, RuntimeError):
    """The loss stayed non-finite for more than train.max_bad_steps micro batches in a row: exit 3."""

    exit_code = 3


class SavesFailing(UserError, RuntimeError):
    """Storage refused checkpoint.max_failed_saves saves in a row, or the run's final one: exit 74 (EX_IOERR)."""

    exit_code = 74


class StopNotSaved(UserError, RuntimeError):
    """A stop signal's checkpoint was refused by storage: the step reached is lost, exit 73 (EX_CANTCREAT)."""

    exit_code = 73


@dataclass
class TrainResult:
    """What a finished `Trainer.train()` reached."""

    steps: int
    schedule_steps: int
    checkpoint: Path  # the final checkpoint
    dropped_micro_batches: int
    eval: dict  # the last evaluation ({} without a validation split)
    time: dict  # where the run's time went (pipeline/engine/timing.py)


@dataclass
class RunState:
    """What changes as the run trains (every rank keeps its own)."""

    step: int = 0
    dropped_total: int = 0  # micro batches dropped for a non-finite loss
    bad_streak: int = 0
    first_bad_step: int | None = None
    tally: StepTally = field(default_factory=StepTally)  # this log window's losses, on the device
    window_start: float = field(default_factory=time.perf_counter)
    last_checkpoint_step: int = -1
    failed_saves: int = 0  # storage refused this many saves in a row
    last_eval: dict = field(default_factory=dict)
    nonfinite_seen: int = 0  # the tally's non-finite count at the last skipped step
    clock: RunClock = field(default_factory=RunClock)  # where the time went (pipeline/engine/timing.py)
    s3_before: list | None = None  # every rank's loader S3 stats at the last record


@dataclass
class StepContext:
    """What the hot loop needs besides the engine, decided once per run."""

    guard_on_host: bool  # check the loss before the backward (DeepSpeed would apply non-finite gradients)
    fp16: bool  # a skipped step can be an fp16 overflow (normal) rather than a non-finite loss
    forward_flops: float | None = None  # per image, for MFU (GPU runs only)
    peak_flops: float | None = None  # of this GPU kind in the run's precision (GPU runs only)


class Trainer:
    """One run: its loaders, step plan, end step, resume point and init decision, then its engine and state."""

    # made by train(), once the weights it starts from are local
    engine: deepspeed.DeepSpeedEngine
    schedule: Scheduler
    metrics: MetricsLog
    ctx: StepContext

    def __init__(self, cfg: RunConfig, world: World):
        self.cfg, self.world, self.run_dir = cfg, world, cfg.run_dir
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / CONFIG_FILE)
        check_shared_run_dir(self.run_dir, world.rank)
        self.precision = resolve_precision(cfg.train.precision)
        train_cfg, val_cfg = loader_configs(cfg, self.precision)
        self.train_loader = create_loader(train_cfg, world.rank, world.size)
        self.val_loader = create_loader(val_cfg, world.rank, world.size) if val_cfg else None
        self.synsets: list[str] = self.train_loader.shard_set.synsets
        self.plan: StepPlan = plan_steps(cfg, world.size, len(self.train_loader))
        self.end = self.plan.end_step(cfg.train.max_steps)
        self.choice = find_resume(cfg, world.rank, world.size)
        self.resume: Path | None = self.choice.path
        # init_from starts a new run; a resumed one has its own weights (a new name or out_dir starts from it)
        self.init_from = cfg.init_from if self.resume is None else ""
        self.state = RunState()

    # -- the run ---------------------------------------------------------------------------------------------
    def train(self, init_path: str = "", tracker=None) -> TrainResult:
        """Trains to the end step; `init_path`: the local copy of `init_from` (a models:/ URI pulled by the
        caller); `tracker`: where the metrics also go (anything with log_metrics)."""
        cfg, state = self.cfg, self.state
        self.engine, self.schedule = build_engine(
            cfg,
            self.world,
            self.plan,
            self.synsets,
            self.precision,
            init_from=init_path if self.init_from else "",
            load_universal=self.resume is not None and needs_universal(self.resume, self.world.size),
        )
        self.metrics = MetricsLog(self.run_dir, self.world.is_main, tracker)
        self.ctx = step_context(cfg, self.precision, self.engine.device, len(self.synsets))
        if self.resume is not None:
            self._load_resume(tracker)
        self._announce()
        self.schedule.step_update(state.step)
        state.clock = RunClock()  # the loop's time, from here
        state.clock.watch_backward(self.engine.module)
        state.window_start = time.perf_counter()
        try:
            if self._evaluation_owed_at_start():
                self.evaluate()
            while state.step < self.end:
                self.run_epoch()
                if cfg.eval.every_steps <= 0 and self.val_loader is not None and self.train_loader.position == 0:
                    self.evaluate()
            if state.last_checkpoint_step != state.step:
                self.checkpoint(final=True)
            if self.val_loader is not None and state.last_eval.get("step") != state.step:
                self.evaluate()
        except RunStopped as stop:
            self.save_at_stop(stop)
            raise
        timing = run_summary(state.clock)
        if self.world.is_main:
            log.info(summary_line(timing))
        return TrainResult(
            state.step,
            self.plan.total_steps,
            complete_checkpoints(self.run_dir / "checkpoints")[-1],
            state.dropped_total,
            state.last_eval,
            timing,
        )

    def _load_resume(self, tracker) -> None:
        """Loads the checkpoint chosen; one that fails to load on any rank is set aside and the next one that
        passes its check is loaded instead (every rank alike); the log, metrics.jsonl and MLflow say which."""
        cfg, world = self.cfg, self.world
        checkpoint = self.resume
        while checkpoint is not None:
            # read before the load: once the ranks agree that it failed, rank 0 may rename it at any moment
            universal_before = needs_universal(checkpoint, world.size)
            error = None
            try:
                loaded = load_checkpoint(self.engine, checkpoint, world.rank, world.size, cfg.train.seed)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001  (a damaged file, whatever DeepSpeed or torch make of it)
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            failed = next(((r, why) for r, why in enumerate(all_gather_object(error)) if why is not None), None)
            if failed is None:
                self._resumed(checkpoint, *loaded)
                break
            damage = Damage(checkpoint, "", "load", f"does not load on rank {failed[0]} ({failed[1]})")
            if cfg.checkpoint.resume != "auto":
                raise CheckpointDamaged(f"checkpoint.resume={cfg.checkpoint.resume}: {damage.line()}")
            self.choice.set_aside.append(set_aside(damage, world.rank))
            barrier()
            choice = find_resume(cfg, world.rank, world.size)  # the older ones; refused when none passes
            choice.set_aside[:0] = self.choice.set_aside
            universal = choice.path is not None and needs_universal(choice.path, world.size)
            if universal != universal_before:  # the engine is built for one kind of load
                self.engine, self.schedule = build_engine(
                    cfg, world, self.plan, self.synsets, self.precision, load_universal=universal
                )
            self.choice, self.resume = choice, choice.path  # never None: find_resume refuses when none passes
            checkpoint = choice.path
        tags = {"swin.resumed_from": str(self.resume)}
        if self.choice.set_aside:
            tags["swin.checkpoints_set_aside"] = "; ".join(self.choice.set_aside)
        set_tags = getattr(tracker, "set_tags", None)
        if set_tags is not None:
            set_tags(tags)
        if self.choice.set_aside:
            self.metrics.write(
                {
                    "step": self.state.step,
                    "resumed_from": str(self.resume),
                    "set_aside": self.choice.set_aside,
                    "verified": self.choice.verified,
                    "time": time.time(),
                }
            )

    def _resumed(self, checkpoint: Path, step: int, loader_state: dict, resumed: dict) -> None:
        """The run's state from the checkpoint just loaded on every rank."""
        state, world = self.state, self.world
        state.step = step
        self.train_loader.load_state_dict(loader_state)
        state.last_checkpoint_step = state.step
        # rank 0 keeps the log; every rank must know whether the evaluation at this step is owed (a collective)
        state.last_eval = broadcast_object(self.metrics.evaluation_at(state.step) if world.is_main else None)
        log.info(
            "resumed from %s at step %d%s",
            checkpoint,
            state.step,
            f" (elastic: {resumed['from_world']} -> {resumed['to_world']} ranks)" if resumed["elastic"] else "",
        )
        if resumed["elastic"]:
            self.schedule.step_update(state.step)
            record_elastic_resume(self.engine, self.run_dir, world, resumed, self.train_loader)

    def _announce(self) -> None:
        if not self.world.is_main:
            return
        cfg, plan = self.cfg, self.plan
        log.info(
            "run %s: %d steps (%d per epoch), global batch %d = %d micro x %d ranks x %d accumulation, %s, "
            "ZeRO-%d, loader %s, %d CPU threads per rank",
            self.run_dir,
            self.end,
            plan.steps_per_epoch,
            cfg.train.global_batch,
            plan.micro_batch,
            self.world.size,
            plan.grad_accum,
            self.precision,
            cfg.train.zero_stage,
            self.train_loader.backend.name,
            torch.get_num_threads(),
        )

    def _evaluation_owed_at_start(self) -> bool:
        """Step 0 of a run initialised from other weights, or the evaluation a stop interrupted."""
        if self.val_loader is None:
            return False
        return bool(self.init_from) or (
            self.resume is not None and bool(checkpoint_meta(self.resume).get("pending_eval"))
        )

    def run_epoch(self) -> None:
        """Micro batches until the epoch's last whole optimizer step, or until the run's end step."""
        loader, state, plan = self.train_loader, self.state, self.plan
        epoch, per_epoch = loader.epoch, plan.steps_per_epoch * plan.grad_accum
        batches = iter(loader)
        try:
            while loader.position < per_epoch and state.step < self.end:
                asked = time.perf_counter()
                images, labels = next(batches)
                ready = time.perf_counter()
                if self.step(images, labels, asked, ready):
                    self.after_step(epoch)
        finally:
            batches.close()
        if loader.epoch == epoch and loader.position >= per_epoch:  # the epoch's last whole step: its rest sits out
            loader.set_epoch(epoch + 1)

    def step(self, images: torch.Tensor, labels: torch.Tensor, asked: float, ready: float) -> bool:
        """One micro batch forward and backward, and the optimizer step at its accumulation boundary; True when
        an optimizer step was taken (a non-finite loss's micro batch or step is dropped instead)."""
        state, engine = self.state, self.engine
        # non_blocking: a pinned CPU batch (torch backend) is copied while the GPU works; DALI's are there
        result = micro_step(
            engine,
            images.to(engine.device, non_blocking=True),
            labels.to(engine.device, non_blocking=True),
            self.cfg.data.label_smoothing,
            state.tally,
            self.ctx.guard_on_host,
        )
        state.clock.micro(asked, ready, result.guard_s)
        if result.dropped or (result.skipped and self._bad_step_skipped()):
            self._on_bad_loss()
            return False
        if not result.stepped:
            return False
        state.bad_streak = 0
        state.step += 1
        state.clock.window.steps += 1
        at_step(state.step)
        self.schedule.step_update(state.step)
        return True

    def after_step(self, epoch: int) -> None:
        """The log, evaluation and checkpoint the step is due, then the ranks' agreement on a stop signal."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.train.log_every == 0 or step == self.end:
            self.log_step(epoch)
        if self.val_loader is not None and cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0:
            self.evaluate()
        if cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0:
            self.checkpoint()
        stop_if_agreed(step, "training")

    # -- log, evaluate, checkpoint -------------------------------------------------------------------------------
    def log_step(self, epoch: int) -> None:
        """One record per log_every steps: the window's losses reduced over the ranks in one all-reduce on their
        device (the only host read of them); on GPUs also MFU and rank 0's peak memory (absent on CPU, not zero)."""
        state, engine, world = self.state, self.engine, self.world.size
        tally = state.tally
        sums = tally.sums if tally.sums is not None else torch.zeros(3, dtype=torch.float64, device=engine.device)
        totals = all_reduce_sum(
            torch.cat([sums, torch.tensor([float(tally.images)], dtype=torch.float64, device=sums.device)])
        ).tolist()
        loss_sum, finite, nonfinite, images = totals
        window = state.clock.close_window()
        # the window's training time: its evaluations and checkpoints have their own fields
        elapsed = time.perf_counter() - state.window_start - window.eval - window.checkpoint
        s3 = self.train_loader.s3_stats()
        ranks = all_gather_object((window.own, window.data, s3))
        timing = window_fields([(own, data) for own, data, _ in ranks], window.steps, elapsed)
        if s3:  # a set on S3: every rank's loader reads from it
            now = [r[2] for r in ranks]
            timing.update(s3_fields(now, state.s3_before))
            state.s3_before = now
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": state.step,
            "epoch": epoch,
            "loss": loss_sum / finite if finite else float("nan"),
            "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": loss_scale(engine),
            "skipped_steps": skipped_steps(engine),  # fp16 overflows, non-finite gradients (DeepSpeed or GradScaler)
            "nonfinite_losses": int(nonfinite),  # in this window, every rank
            "dropped_micro_batches": state.dropped_total,
            "images_per_s": images / elapsed if elapsed > 0 else None,
            "images_per_s_per_rank": images / elapsed / world if elapsed > 0 else None,
            **timing,  # step time, each rank's own time (the slowest named), data wait
            "world_size": world,  # an elastic resume shows on the curves
            "time": time.time(),
        }
        if window.checkpoint:
            record["checkpoint_s"] = window.checkpoint  # saved since the last record (rank 0's time)
        if window.eval:
            record["eval_s"] = window.eval
        if engine.device.type == "cuda":
            ctx = self.ctx
            if ctx.forward_flops is not None and ctx.peak_flops is not None and elapsed > 0:
                record["mfu"] = mfu(images / elapsed / world, ctx.forward_flops, ctx.peak_flops)
            record.update(memory_fields(engine.device))
        self.metrics.write(record)
        tally.reset()
        state.nonfinite_seen = 0
        state.window_start = time.perf_counter()

    def evaluate(self) -> None:
        """The validation split's top-1/top-5 and loss at this step, recorded (a stop is agreed between batches)."""
        state = self.state
        t0 = time.perf_counter()
        try:
            result = evaluate(
                self.engine,
                self.val_loader,
                self.engine.device,
                between_batches=lambda: stop_if_agreed(state.step, "evaluation"),
            )
        finally:
            seconds = time.perf_counter() - t0
            state.clock.window.eval += seconds
        state.last_eval = {"step": state.step, **result}
        self.metrics.write({**state.last_eval, "eval_s": seconds, "time": time.time()})

    def checkpoint(self, meta: dict | None = None, final: bool = False) -> bool:
        """A complete checkpoint at this step (every rank writes its part); whether storage took it.

        A refused save (SaveFailed, on every rank) leaves nothing behind: rank 0 warns once, with the path and the
        free space, and records it; the run goes on and tries again at the next interval. `final` (the run's
        last) or checkpoint.max_failed_saves refusals in a row raise SavesFailing."""
        cfg, state, world = self.cfg, self.state, self.world
        t0 = time.perf_counter()
        try:
            save_checkpoint(
                self.engine,
                cfg,
                state.step,
                world.rank,
                world.size,
                self.train_loader.state_dict(),
                self.synsets,
                meta,
                keep=self.resume,  # the newest checkpoint that passed a check
            )
        except SaveFailed as failed:
            state.failed_saves += 1
            state.clock.window.checkpoint += time.perf_counter() - t0
            self.metrics.write(
                {
                    "step": state.step,
                    "checkpoint_failed": str(failed.path),
                    "why": failed.why,
                    "free_bytes": failed.free,
                    "failed_saves": state.failed_saves,
                    "time": time.time(),
                }
            )
            newest = complete_checkpoints(self.run_dir / "checkpoints")
            if world.is_main:
                log.warning(
                    "checkpoint at step %d not saved (%d in a row, checkpoint.max_failed_saves=%d): %s; %s free in "
                    "%s; kept: %s; training goes on and saves again at the next interval",
                    state.step,
                    state.failed_saves,
                    cfg.checkpoint.max_failed_saves,
                    failed.why,
                    free_text(failed.free),
                    failed.path.parent,
                    newest[-1].name if newest else "no checkpoint yet",
                )
            if final or state.failed_saves >= cfg.checkpoint.max_failed_saves:
                raise SavesFailing(
                    f"{'the final checkpoint' if final else f'{state.failed_saves} checkpoints in a row'} could not "
                    f"be saved, the last at step {state.step}: {failed.why}, {free_text(failed.free)} free in "
                    f"{failed.path.parent}; newest checkpoint: {newest[-1] if newest else 'none'}. Free space, then "
                    f"run the same command to resume"
                ) from None
            return False
        state.failed_saves = 0
        state.last_checkpoint_step = state.step
        state.clock.window.checkpoint += time.perf_counter() - t0
        return True

    def save_at_stop(self, stop: RunStopped) -> None:
        """The checkpoint at the step the run reached (a periodic one may be there already), and a record of it;
        StopNotSaved when storage refused it."""
        state, flag = self.state, stop_flag()
        t0 = time.monotonic()
        saved = state.last_checkpoint_step != state.step
        if saved:
            try:
                self.checkpoint({"stopped": stop.signal_name, "pending_eval": stop.during == "evaluation"}, final=True)
            except SavesFailing:
                newest = complete_checkpoints(self.run_dir / "checkpoints")
                raise StopNotSaved(
                    f"stopped by {stop.signal_name} at step {state.step}, but its checkpoint could not be saved: "
                    f"step {state.step} is lost; the same command resumes from "
                    f"{newest[-1] if newest else 'the start (no checkpoint)'}"
                ) from None
        seconds = time.monotonic() - t0
        since = flag.seconds_since()
        record = {
            "step": state.step,
            "stopped": stop.signal_name,
            "during": stop.during,
            "checkpoint_s": round(seconds, 3) if saved else 0.0,
            "time": time.time(),
        }
        if since is not None:
            record["signal_to_saved_s"] = round(since, 3)  # this rank's signal; another rank may have had it
        self.metrics.write(record)
        if self.world.is_main:
            log.info(
                "stopped by %s at step %d (%s): %s; run the same command to resume",
                stop.signal_name,
                state.step,
                stop.during,
                f"checkpoint saved in {seconds:.1f} s" if saved else "its checkpoint was saved already",
            )

    # -- non-finite losses ---------------------------------------------------------------------------------------
    def _bad_step_skipped(self) -> bool:
        """DeepSpeed skipped a step (rare; on every rank, its check is global): from non-finite gradients, which in
        bf16/fp32 means a bad step, or, in fp16, maybe an overflow of the loss-scaled gradients, which dynamic loss
        scaling expects. In fp16 the ranks agree on whether any of them saw a non-finite loss since the last skip
        (every rank takes the same branch: _on_bad_loss may checkpoint, a collective); the tally is read only here."""
        state = self.state
        if not self.ctx.fp16:
            return True
        seen, state.nonfinite_seen = state.nonfinite_seen, state.tally.nonfinite()
        return not all_true(state.nonfinite_seen == seen)

    def _on_bad_loss(self) -> None:
        """A non-finite loss: its micro batch was dropped on every rank before the backward, or DeepSpeed skipped
        its optimizer step; either way the weights are untouched by it."""
        cfg, state, engine = self.cfg, self.state, self.engine
        state.dropped_total += 1
        state.bad_streak += 1
        if state.bad_streak == 1:
            state.first_bad_step = state.step
            log.warning("non-finite loss at step %d: micro batch dropped (%d so far)", state.step, state.dropped_total)
            # keep the weights from before it; only at a step boundary, where no gradients are half accumulated
            if (
                state.last_checkpoint_step != state.step
                and engine.micro_steps % engine.gradient_accumulation_steps() == 0
            ):
                self.checkpoint()
        if state.bad_streak > cfg.train.max_bad_steps:
            newest = complete_checkpoints(self.run_dir / "checkpoints")
            raise TrainingDiverged(
                f"the loss was not finite for {state.bad_streak} micro batches in a row since step "
                f"{state.first_bad_step} (train.max_bad_steps={cfg.train.max_bad_steps}); newest checkpoint from "
                f"before it: {newest[-1] if newest else 'none'}. Lower the LR, check the data "
                f"(`python -m data_prep verify`), or use bf16/fp32 instead of fp16."
            )


def loader_configs(cfg: RunConfig, precision: str) -> tuple[LoaderConfig, LoaderConfig | None]:
    """The train loader's config and, with a validation split, the evaluation loader's."""
    d, m = cfg.data, cfg.model
    common = LoaderConfig(
        shards=d.shards,
        image_size=m.img_size,
        backend=d.backend,
        workers=d.workers,
        seed=d.seed,
        max_bad_shards=d.max_bad_shards,
        dtype=DTYPES[precision],
        cache_dir=d.cache_dir,
        cache_bytes=d.cache_bytes,
        read_ahead=d.read_ahead,
        crop_pct=d.crop_pct,
    )
    train = replace(
        common,
        split=d.train_split,
        train=True,
        batch_size=cfg.train.micro_batch,
        rand_augment=d.rand_augment,
        mixup=d.mixup,
        cutmix=d.cutmix,
        label_smoothing=d.label_smoothing,
        random_erasing=d.random_erasing,
    )
    val = replace(common, split=d.val_split, train=False, batch_size=cfg.eval.batch_size) if d.val_split else None
    return train, val


def build_engine(
    cfg: RunConfig,
    world: World,
    plan: StepPlan,
    synsets: list[str],
    precision: str,
    init_from: str = "",
    load_universal: bool = False,
) -> tuple[deepspeed.DeepSpeedEngine, Scheduler]:
    """The DeepSpeed engine and LR schedule; the model starts from the weights at `init_from` (a local path)
    when given; `load_universal`: the engine will load a universal checkpoint (an elastic resume)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    m = cfg.model
    model = create_model(
        m.arch, m.img_size, m.window_size, len(synsets), m.drop_path, m.grad_checkpointing, m.fused_attn
    )
    if init_from:
        initialise_from(cfg, init_from, model, synsets, world)
    optimizer = create_optimizer(model, cfg)
    schedule = create_schedule(optimizer, cfg, plan)
    config = deepspeed_config(cfg, plan, world.size, precision)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config=config)
    torch.manual_seed(cfg.train.seed + 1 + world.rank)  # each rank its own drop-path stream
    return engine, schedule


def initialise_from(cfg: RunConfig, path: str, model: torch.nn.Module, synsets: list[str], world: World) -> None:
    """Every rank loads the source (the same bytes, so the same weights); rank 0 records what was done."""
    source = load_source(path)
    report = initialise(model, source, synsets, cfg.transfer.bias_tables, cfg.transfer.head)
    if world.is_main:
        init_record, head_map = INIT_FILES
        write_map(cfg.run_dir / head_map, source.description, "this run's shard set", source.synsets, synsets)
        (cfg.run_dir / init_record).write_text(
            json.dumps(
                {
                    "init_from": redact_text(cfg.init_from),
                    "source": source.description,
                    "weights_sha256": source.weights_sha256 or None,
                    # a released model's head: which layout its rows were read in, and why (model/head_layouts.py)
                    "source_head_layout": source.meta.get("head_layout"),
                    "source_head_layout_why": source.meta.get("head_layout_why"),
                    **report.as_params(),
                    "resized_tables": report.resized_tables,
                    "fresh_synsets": report.fresh_synsets,
                },
                indent=1,
            )
        )


def step_context(cfg: RunConfig, precision: str, device: torch.device, num_classes: int) -> StepContext:
    """The hot loop's per-run decisions: where the finite-loss check runs, fp16, and the MFU inputs on GPUs."""
    ctx = StepContext(not deepspeed_skips_nonfinite(cfg.train.zero_stage, precision), precision == "fp16")
    if device.type == "cuda":
        m = cfg.model
        ctx.peak_flops = peak_flops(current_gpu().name, precision)
        if ctx.peak_flops is not None:
            ctx.forward_flops = forward_flops(m.arch, m.img_size, m.window_size, num_classes)
    return ctx
