"""The training loop: data -> forward/backward -> step -> log -> eval -> checkpoint, each a small function.

`prepare(cfg, world)` makes the run's folder, the loaders and the step plan and finds the checkpoint to resume
(`checkpoint.resume: auto`); `train(setup, metrics_sink)` builds the model, the optimizer/schedule and the
DeepSpeed engine, resumes, runs until the schedule (or train.max_steps) ends, and leaves a final checkpoint.
The loop only trains: exporting, curves, registration and the MLflow run's end are end-of-run steps that
`python -m pipeline.train` calls (pipeline/train.py).

A stop signal (pipeline/engine/stop.py) is agreed on after every optimizer step and between evaluation batches;
the run then saves a checkpoint at the step it reached (unless one is there already) and raises RunStopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.shardset.layout import write_map
from pipeline.config import RunConfig, dump_config
from swin_common.gpu import current_gpu, memory_fields, mfu, peak_flops
from swin_common.redact import redact_text
from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.engine.checkpoint import (check_shared_run_dir, checkpoint_meta, complete_checkpoints, find_resume,
                                       load_checkpoint, needs_universal, save_checkpoint)
from pipeline.engine.distributed import (World, all_gather_object, all_reduce_sum, all_true, broadcast_object,
                                         world_size)
from pipeline.engine.validation import evaluate
from pipeline.engine.model_export import load_source
from pipeline.engine.optim import (StepPlan, create_optimizer, create_schedule, deepspeed_config,
                                   deepspeed_skips_nonfinite, loss_scale, plan_steps, resolve_precision,
                                   skipped_steps)
from pipeline.engine.step import StepTally, micro_step
from pipeline.engine.stop import RunStopped, stop_flag
from pipeline.engine.timing import RunClock, run_summary, s3_fields, summary_line, window_fields
from pipeline.engine.watchdog import at_step
from pipeline.model import create_model, forward_flops
from pipeline.model.transfer import initialise

log = logging.getLogger("pipeline.train")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class RunState:
    step: int = 0
    dropped_total: int = 0  # micro batches dropped for a non-finite loss
    bad_streak: int = 0
    first_bad_step: int | None = None
    tally: StepTally = field(default_factory=StepTally)  # this log window's losses, on the device
    window_start: float = field(default_factory=time.perf_counter)
    last_checkpoint_step: int = -1
    last_eval: dict = field(default_factory=dict)
    nonfinite_seen: int = 0  # the tally's non-finite count at the last skipped step
    clock: RunClock = field(default_factory=RunClock)  # where the time went (pipeline/engine/timing.py)
    s3_stats: object = None  # the train loader's s3_stats (cache hits/misses, read-ahead depth), for the log
    s3_before: list | None = None  # every rank's s3_stats at the last record


class MetricsLog:
    """Rank 0 appends one JSON line per log/eval event to <run>/metrics.jsonl, prints a short line and hands
    the values to MLflow (at the record's step)."""

    def __init__(self, path: Path, enabled: bool, tracker=None):
        self.path, self.enabled, self.tracker = path, enabled, tracker  # tracker: anything with log_metrics

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(" ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "time"))
        if self.tracker is not None:
            self.tracker.log_metrics(record["step"], {k: v for k, v in record.items()
                                                      if k not in ("step", "time", "epoch")})

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


def loader_configs(cfg: RunConfig, precision: str) -> tuple[LoaderConfig, LoaderConfig | None]:
    d, m = cfg.data, cfg.model
    common = dict(shards=d.shards, image_size=m.img_size, backend=d.backend, workers=d.workers, seed=d.seed,
                  max_bad_shards=d.max_bad_shards, dtype=DTYPES[precision], cache_dir=d.cache_dir,
                  cache_bytes=d.cache_bytes, read_ahead=d.read_ahead, crop_pct=d.crop_pct)
    train = LoaderConfig(split=d.train_split, train=True, batch_size=cfg.train.micro_batch,
                         rand_augment=d.rand_augment, mixup=d.mixup, cutmix=d.cutmix,
                         label_smoothing=d.label_smoothing, random_erasing=d.random_erasing, **common)
    val = LoaderConfig(split=d.val_split, train=False, batch_size=cfg.eval.batch_size, **common) \
        if d.val_split else None
    return train, val


def build_engine(cfg: RunConfig, world: World, plan: StepPlan, synsets: list[str], precision: str,
                 init_from: str = "", load_universal: bool = False):
    """The DeepSpeed engine and LR schedule; the model starts from the weights at `init_from` (a local path)
    when given; `load_universal`: the engine will load a universal checkpoint (an elastic resume)."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    m = cfg.model
    model = create_model(m.arch, m.img_size, m.window_size, len(synsets), m.drop_path, m.grad_checkpointing,
                         m.fused_attn)
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


def initialise_from(cfg: RunConfig, path: str, model, synsets: list[str], world: World) -> None:
    """Every rank loads the source (the same bytes, so the same weights); rank 0 records what was done."""
    source = load_source(path)
    report = initialise(model, source, synsets, cfg.transfer.bias_tables, cfg.transfer.head)
    if world.is_main:
        write_map(cfg.run_dir / "head_map.json", source.description, "this run's shard set", source.synsets, synsets)
        (cfg.run_dir / "init.json").write_text(json.dumps(
            {"init_from": redact_text(cfg.init_from), "source": source.description,
             "weights_sha256": source.weights_sha256 or None, **report.as_params(),
             "resized_tables": report.resized_tables, "fresh_synsets": report.fresh_synsets}, indent=1))


@dataclass
class StepContext:
    """What the hot loop needs besides the engine, decided once per run."""
    guard_on_host: bool  # check the loss before the backward (DeepSpeed would apply non-finite gradients)
    fp16: bool  # a skipped step can be an fp16 overflow (normal) rather than a non-finite loss
    forward_flops: float | None = None  # per image, for MFU (GPU runs only)
    peak_flops: float | None = None  # of this GPU kind in the run's precision (GPU runs only)


def step_context(cfg: RunConfig, precision: str, device: torch.device, num_classes: int) -> StepContext:
    ctx = StepContext(not deepspeed_skips_nonfinite(cfg.train.zero_stage, precision), precision == "fp16")
    if device.type == "cuda":
        m = cfg.model
        ctx.peak_flops = peak_flops(current_gpu().name, precision)
        if ctx.peak_flops is not None:
            ctx.forward_flops = forward_flops(m.arch, m.img_size, m.window_size, num_classes)
    return ctx


@dataclass
class Setup:
    """What a run is made of before its engine exists."""
    cfg: RunConfig
    world: World
    train_loader: object
    val_loader: object | None
    synsets: list[str]
    plan: StepPlan
    precision: str
    resume: Path | None  # the checkpoint to resume from, or None for a fresh start
    init_path: str = ""  # local weights to start from (cfg.init_from, a models:/ URI pulled by the caller)


def prepare(cfg: RunConfig, world: World) -> Setup:
    """The run's folder and config dump, its loaders, step plan and the checkpoint to resume."""
    if world.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, cfg.run_dir / "config.yaml")
    check_shared_run_dir(cfg.run_dir, world.rank)
    precision = resolve_precision(cfg.train.precision)
    train_cfg, val_cfg = loader_configs(cfg, precision)
    train_loader = create_loader(train_cfg, world.rank, world.size)
    val_loader = create_loader(val_cfg, world.rank, world.size) if val_cfg else None
    plan = plan_steps(cfg, world.size, len(train_loader))
    resume = find_resume(cfg)
    init_path = "" if resume is not None else cfg.init_from
    return Setup(cfg, world, train_loader, val_loader, train_loader.shard_set.synsets, plan, precision, resume,
                 init_path)


# what prepare, the tracker (mlflow_run.json: its MLflow run, which a rerun would continue) and the engine's set-up
# write into a run folder before its first step (ranks/ is the watchdog's: pipeline/engine/watchdog.py)
STARTED_FILES = ("config.yaml", ".ranks-see-this", ".ranks-see-this.tmp", "mlflow_run.json", "init.json",
                 "head_map.json")


def discard_unstarted_run(run_dir: Path, world_size: int) -> bool:
    """Rank 0, on a failure: a run that never reached its first step (no checkpoint, nothing in metrics.jsonl)
    leaves nothing behind: the files its start wrote are removed, then the folder when nothing else is in it.
    In a job of several ranks, ranks/ stays: the watchdogs of the other ranks still write there on their way out
    (which rank ended), and an error line may point to it. Returns whether the folder was removed."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or complete_checkpoints(run_dir / "checkpoints") or \
            (metrics.is_file() and metrics.stat().st_size):
        return False
    for name in (*STARTED_FILES, "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    folders = ["checkpoints", "nccl_traces", *(["ranks/start", "ranks"] if world_size == 1 else [])]
    for folder in [*(run_dir / name for name in folders), run_dir]:
        try:
            folder.rmdir()  # only when empty: what the user (or a tool) put there stays
        except OSError:
            pass
    return not run_dir.exists()


def train(setup: Setup, tracker=None) -> dict:
    """Trains to the end of the schedule (or train.max_steps); returns a summary naming the final checkpoint."""
    return run(setup.cfg, setup.world, setup.train_loader, setup.val_loader, setup.synsets, setup.plan,
               setup.precision, setup.resume, tracker, setup.init_path)


def run(cfg: RunConfig, world: World, train_loader, val_loader, synsets, plan: StepPlan, precision: str,
        resume: Path | None, tracker=None, init_path: str = "") -> dict:
    run_dir = cfg.run_dir
    engine, schedule = build_engine(cfg, world, plan, synsets, precision, init_from="" if resume else init_path,
                                    load_universal=resume is not None and needs_universal(resume, world.size))
    metrics = MetricsLog(run_dir / "metrics.jsonl", world.is_main, tracker)
    state = RunState()
    ctx = step_context(cfg, precision, engine.device, len(synsets))

    if resume is not None:
        state.step, loader_state, done = load_checkpoint(engine, resume, world.rank, world.size, cfg.train.seed)
        train_loader.load_state_dict(loader_state)
        state.last_checkpoint_step = state.step
        # rank 0 keeps the log; every rank must know whether the evaluation at this step is owed (a collective)
        state.last_eval = broadcast_object(metrics.evaluation_at(state.step) if world.is_main else None)
        log.info("resumed from %s at step %d%s", resume, state.step,
                 f" (elastic: {done['from_world']} -> {done['to_world']} ranks)" if done["elastic"] else "")
        if done["elastic"]:
            schedule.step_update(state.step)
            record_elastic_resume(engine, run_dir, world, done, train_loader)
    end = plan.total_steps if cfg.train.max_steps <= 0 else min(plan.total_steps, cfg.train.max_steps)
    if world.is_main:
        log.info("run %s: %d steps (%d per epoch), global batch %d = %d micro x %d ranks x %d accumulation, %s, "
                 "ZeRO-%d, loader %s, %d CPU threads per rank", run_dir, end, plan.steps_per_epoch,
                 cfg.train.global_batch, plan.micro_batch, world.size, plan.grad_accum, precision,
                 cfg.train.zero_stage, train_loader.backend.name, torch.get_num_threads())
    schedule.step_update(state.step)

    def checkpoint(meta: dict | None = None):
        t0 = time.perf_counter()
        save_checkpoint(engine, cfg, state.step, world.rank, world.size, train_loader.state_dict(), synsets, meta)
        state.last_checkpoint_step = state.step
        state.clock.window.checkpoint += time.perf_counter() - t0

    state.s3_stats = train_loader.s3_stats
    state.clock = RunClock()  # the loop's time, from here
    state.clock.watch_backward(engine.module)
    state.window_start = time.perf_counter()

    try:
        if val_loader is not None and ((cfg.init_from and resume is None) or  # step 0: the initialised model
                                       (resume is not None and checkpoint_meta(resume).get("pending_eval"))):
            eval_now(engine, val_loader, state, metrics)  # or the evaluation a stop interrupted
        while state.step < end:
            run_epoch(cfg, engine, schedule, train_loader, val_loader, plan, end, state, metrics, checkpoint, ctx)
            if cfg.eval.every_steps <= 0 and val_loader is not None and train_loader.position == 0:
                eval_now(engine, val_loader, state, metrics)
        if state.last_checkpoint_step != state.step:
            checkpoint()
        if val_loader is not None and state.last_eval.get("step") != state.step:
            eval_now(engine, val_loader, state, metrics)
    except RunStopped as stop:
        save_at_stop(stop, state, checkpoint, metrics, world)
        raise
    final = complete_checkpoints(run_dir / "checkpoints")[-1]
    timing = run_summary(state.clock)
    if world.is_main:
        log.info(summary_line(timing))
    return {"steps": state.step, "schedule_steps": plan.total_steps, "dropped_micro_batches": state.dropped_total,
            "eval": state.last_eval, "checkpoint": str(final), "time": timing}


def stop_if_agreed(step: int, during: str) -> None:
    """At a boundary, on every rank: RunStopped (at `step`) when any rank received a stop signal."""
    name = stop_flag().agreed()
    if name:
        raise RunStopped(name, step, during)


def save_at_stop(stop: RunStopped, state: RunState, checkpoint, metrics: MetricsLog, world: World) -> None:
    """The checkpoint at the step the run reached (a periodic one may be there already), and a record of it."""
    flag = stop_flag()
    t0 = time.monotonic()
    saved = state.last_checkpoint_step != state.step
    if saved:
        checkpoint({"stopped": stop.signal_name, "pending_eval": stop.during == "evaluation"})
    seconds = time.monotonic() - t0
    since = flag.seconds_since()
    record = {"step": state.step, "stopped": stop.signal_name, "during": stop.during,
              "checkpoint_s": round(seconds, 3) if saved else 0.0, "time": time.time()}
    if since is not None:
        record["signal_to_saved_s"] = round(since, 3)  # this rank's signal; another rank may have had it
    metrics.write(record)
    if world.is_main:
        log.info("stopped by %s at step %d (%s): %s; run the same command to resume", stop.signal_name, state.step,
                 stop.during, f"checkpoint saved in {seconds:.1f} s" if saved else "its checkpoint was saved already")


def record_elastic_resume(engine, run_dir: Path, world: World, done: dict, loader) -> None:
    """Rank 0 appends what an elastic resume did to <run>/resumes.jsonl: the step, the world sizes, the LR the
    schedule gives, each optimizer group's weight decay, where the data resumes, and a fingerprint of the fp32
    master weights (per parameter: sum and sum of squares), to compare with the checkpoint it came from."""
    fingerprint = fp32_fingerprint(engine)  # a collective under ZeRO-3: every rank takes part
    if world.is_main:
        record = {**done, "lr": engine.get_lr()[0], "loader_epoch": loader.epoch, "consumed": loader.consumed(),
                  "fp32_fingerprint": fingerprint, "time": time.time()}
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def fp32_fingerprint(engine) -> dict[str, list[float]]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = tensor_fingerprint(param.detach() if full is None else full)
    return out


def tensor_fingerprint(t: torch.Tensor) -> list[float]:
    """[sum, sum of squares] in float64, summed by numpy (pairwise, one thread: one fixed order), so the same
    weights give the same numbers whatever the threads or ranks at work (torch's parallel sum changes its order
    with the thread count). One float64 copy of the tensor at a time: cheap next to a resume, even for Swin-L."""
    values = t.detach().to("cpu", torch.float64).numpy().ravel()
    return [float(values.sum()), float((values * values).sum())]


def run_epoch(cfg, engine, schedule, loader, val_loader, plan: StepPlan, end: int, state: RunState,
              metrics: MetricsLog, checkpoint, ctx: StepContext) -> None:
    """Micro batches until the epoch's last whole optimizer step, or until the run's last step."""
    epoch, per_epoch = loader.epoch, plan.steps_per_epoch * plan.grad_accum
    batches = iter(loader)
    try:
        while loader.position < per_epoch and state.step < end:
            asked = time.perf_counter()
            images, labels = next(batches)
            ready = time.perf_counter()
            # non_blocking: a pinned CPU batch (torch backend) is copied while the GPU works; DALI's are there
            result = micro_step(engine, images.to(engine.device, non_blocking=True),
                                labels.to(engine.device, non_blocking=True), cfg.data.label_smoothing, state.tally,
                                ctx.guard_on_host)
            state.clock.micro(asked, ready, result.guard_s)
            if result.dropped or (result.skipped and bad_step_skipped(state, ctx)):
                on_bad_loss(cfg, state, checkpoint, engine)
                continue
            if result.stepped:
                state.bad_streak = 0
                state.step += 1
                state.clock.window.steps += 1
                at_step(state.step)
                schedule.step_update(state.step)
                after_step(cfg, engine, val_loader, state, metrics, checkpoint, epoch, end, ctx)
                stop_if_agreed(state.step, "training")
    finally:
        batches.close()
    if loader.epoch == epoch and loader.position >= per_epoch:  # the epoch's last whole step: its rest sits out
        loader.set_epoch(epoch + 1)


def bad_step_skipped(state: RunState, ctx: StepContext) -> bool:
    """DeepSpeed skipped a step (rare; on every rank, its check is global): from non-finite gradients, which in
    bf16/fp32 means a bad step, or, in fp16, maybe an overflow of the loss-scaled gradients, which dynamic loss
    scaling expects. In fp16 the ranks agree on whether any of them saw a non-finite loss since the last skip
    (every rank takes the same branch: on_bad_loss may checkpoint, a collective); the tally is read only here."""
    if not ctx.fp16:
        return True
    seen, state.nonfinite_seen = state.nonfinite_seen, state.tally.nonfinite()
    return not all_true(state.nonfinite_seen == seen)


def after_step(cfg, engine, val_loader, state: RunState, metrics: MetricsLog, checkpoint, epoch: int, end: int,
               ctx: StepContext):
    if state.step % cfg.train.log_every == 0 or state.step == end:
        log_step(engine, state, metrics, epoch, ctx)
    if val_loader is not None and cfg.eval.every_steps > 0 and state.step % cfg.eval.every_steps == 0:
        eval_now(engine, val_loader, state, metrics)
    if cfg.checkpoint.every_steps > 0 and state.step % cfg.checkpoint.every_steps == 0:
        checkpoint()


def log_step(engine, state: RunState, metrics: MetricsLog, epoch: int, ctx: StepContext) -> None:
    """One record per log_every steps: the window's losses reduced over the ranks in one all-reduce on their
    device (the only host read of them); on GPUs also MFU and rank 0's peak memory (absent on CPU, not zero)."""
    tally, world = state.tally, world_size()
    sums = tally.sums if tally.sums is not None else torch.zeros(3, dtype=torch.float64, device=engine.device)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([float(tally.images)], dtype=torch.float64,
                                                          device=sums.device)])).tolist()
    loss_sum, finite, nonfinite, images = totals
    window = state.clock.close_window()
    # the window's training time: its evaluations and checkpoints have their own fields
    elapsed = time.perf_counter() - state.window_start - window.eval - window.checkpoint
    s3 = state.s3_stats() if state.s3_stats is not None else {}
    ranks = all_gather_object((window.own, window.data, s3))
    timing = window_fields([(own, data) for own, data, _ in ranks], window.steps, elapsed)
    if s3:  # a set on S3: every rank's loader reads from it
        now = [r[2] for r in ranks]
        timing.update(s3_fields(now, state.s3_before))
        state.s3_before = now
    grad_norm = engine.get_global_grad_norm()
    scale = loss_scale(engine)
    record = {
        "step": state.step, "epoch": epoch, "loss": loss_sum / finite if finite else float("nan"),
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_scale": scale,
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
        if ctx.forward_flops is not None and elapsed > 0:
            record["mfu"] = mfu(images / elapsed / world, ctx.forward_flops, ctx.peak_flops)
        record.update(memory_fields(engine.device))
    metrics.write(record)
    tally.reset()
    state.nonfinite_seen = 0
    state.window_start = time.perf_counter()


def eval_now(engine, val_loader, state: RunState, metrics: MetricsLog) -> None:
    t0 = time.perf_counter()
    try:
        result = evaluate(engine, val_loader, engine.device,
                          between_batches=lambda: stop_if_agreed(state.step, "evaluation"))
    finally:
        seconds = time.perf_counter() - t0
        state.clock.window.eval += seconds
    state.last_eval = {"step": state.step, **result}
    metrics.write({**state.last_eval, "eval_s": seconds, "time": time.time()})


def on_bad_loss(cfg: RunConfig, state: RunState, checkpoint, engine) -> None:
    """A non-finite loss: its micro batch was dropped on every rank before the backward, or DeepSpeed skipped
    its optimizer step; either way the weights are untouched by it."""
    state.dropped_total += 1
    state.bad_streak += 1
    if state.bad_streak == 1:
        state.first_bad_step = state.step
        log.warning("non-finite loss at step %d: micro batch dropped (%d so far)", state.step, state.dropped_total)
        # keep the weights from before it; only at a step boundary, where no gradients are half accumulated
        if state.last_checkpoint_step != state.step and engine.micro_steps % engine.gradient_accumulation_steps() == 0:
            checkpoint()
    if state.bad_streak > cfg.train.max_bad_steps:
        newest = complete_checkpoints(cfg.run_dir / "checkpoints")
        raise TrainingDiverged(
            f"the loss was not finite for {state.bad_streak} micro batches in a row since step "
            f"{state.first_bad_step} (train.max_bad_steps={cfg.train.max_bad_steps}); newest checkpoint from "
            f"before it: {newest[-1] if newest else 'none'}. Lower the LR, check the data "
            f"(`python -m data_prep verify`), or use bf16/fp32 instead of fp16.")

