"""Optimizer, LR schedule and the DeepSpeed config, from the run config.

- AdamW (torch's, built by timm's `create_optimizer_v2`): no weight decay on norms, biases and relative position
  bias tables (timm's `filter_bias_and_bn` plus the model's `no_weight_decay()` names). torch's optimizer, not
  DeepSpeed's FusedAdam/CPUAdam, so nothing is compiled on first run; ZeRO partitions it all the same.
- LR scaled with the global batch as the official recipe does: base_lr x global_batch / lr_batch_base.
- Per-optimizer-step linear warm-up, then cosine / linear / constant (timm's schedulers, warm-up as a prefix).
  The schedule is a pure function of the step: resuming needs only the step, which DeepSpeed's checkpoint holds.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from pipeline.config import ConfigError, Decay, Precision, RunConfig, ZeroStage
from swin_common.gpu import Gpu, check_precision, current_gpu, precision_for


@dataclass(frozen=True)
class StepPlan:
    """How the global batch is made and how many optimizer steps the run takes."""

    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def end_step(self, max_steps: int) -> int:
        """The step a run stops at: the schedule's end, or train.max_steps when that comes first (> 0)."""
        return self.total_steps if max_steps <= 0 else min(self.total_steps, max_steps)


def plan_steps(cfg: RunConfig, world: int, micro_batches_per_epoch: int) -> StepPlan:
    t = cfg.train
    if t.global_batch % (t.micro_batch * world):
        fits = [w for w in range(1, t.global_batch // t.micro_batch + 1) if t.global_batch % (t.micro_batch * w) == 0]
        raise ConfigError(
            f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch "
            f"{t.micro_batch} x world size {world}: with micro batch {t.micro_batch} the world sizes "
            f"that keep the global batch are {', '.join(map(str, fits[:12]))}"
            f"{' ...' if len(fits) > 12 else ''}; or change train.micro_batch"
        )
    accum = t.global_batch // (t.micro_batch * world)
    steps_per_epoch = micro_batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch holds {micro_batches_per_epoch} micro batches per rank, fewer than one "
            f"optimizer step ({accum} micro batches): lower train.global_batch"
        )
    total = max(1, round(cfg.schedule.epochs * steps_per_epoch))
    warmup = min(total - 1, round(cfg.schedule.warmup_epochs * steps_per_epoch))
    return StepPlan(t.micro_batch, accum, steps_per_epoch, total, warmup)


def scaled_lr(cfg: RunConfig, lr: float) -> float:
    return lr * cfg.train.global_batch / cfg.optim.lr_batch_base


def create_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return create_optimizer_v2(
        model,
        "adamw",
        lr=scaled_lr(cfg, o.base_lr),
        weight_decay=o.weight_decay,
        betas=o.betas,
        eps=o.eps,
        filter_bias_and_bn=True,
    )


class _Warmup(TypedDict):
    """The arguments every timm scheduler of create_schedule gets."""

    warmup_t: int
    warmup_lr_init: float
    warmup_prefix: bool
    t_in_epochs: bool


def create_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, plan: StepPlan) -> Scheduler:
    """A timm scheduler stepped per optimizer step with `step_update(step)`."""
    s = cfg.schedule
    common: _Warmup = {
        "warmup_t": plan.warmup_steps,
        "warmup_lr_init": scaled_lr(cfg, s.warmup_lr),
        "warmup_prefix": True,
        "t_in_epochs": False,
    }
    decay_steps = max(1, plan.total_steps - plan.warmup_steps)
    if s.decay == "cosine":
        return CosineLRScheduler(optimizer, t_initial=decay_steps, lr_min=scaled_lr(cfg, s.min_lr), **common)
    if s.decay == "linear":
        return PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, lr_min=scaled_lr(cfg, s.min_lr), **common)
    if s.decay == "constant":
        return StepLRScheduler(optimizer, decay_t=10**12, decay_rate=1.0, **common)
    raise ValueError(f"schedule.decay must be one of {', '.join(typing.get_args(Decay))}, not {s.decay!r}")


def resolve_precision(precision: str, gpu: Gpu | None | Literal["detect"] = "detect") -> str:
    """The precision a run trains in, `auto` resolved from the GPU.

    The precision a run trains in: `auto` is bf16 from compute capability 8.0 on (A100, H100, H200), fp16 with
    dynamic loss scaling below (V100), fp32 without a GPU. `gpu`: the device's facts (default: this rank's)."""
    if gpu == "detect":
        gpu = current_gpu() if torch.cuda.is_available() else None
    if precision == "auto":
        return "fp32" if gpu is None else precision_for(gpu)
    if precision not in typing.get_args(Precision):
        raise ValueError(f"train.precision must be one of {', '.join(typing.get_args(Precision))}, not {precision!r}")
    if precision == "fp16" and gpu is None:
        raise ConfigError(
            "train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use fp32 or bf16"
        )
    if gpu is not None:
        check_precision(precision, gpu)
    return precision


LOW_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}
BUCKET_ELEMENTS = 25_000_000  # ZeRO-1/2 gradient reduce and parameter all-gather buckets (DeepSpeed: 5e8)


def deepspeed_config(cfg: RunConfig, plan: StepPlan, world: int, precision: str) -> dict:
    """The DeepSpeed config of a run. Precision, per ZeRO stage (what DeepSpeed 0.19.8 does with each):

    - ZeRO-0 in bf16/fp16: DeepSpeed's `torch_autocast` over fp32 weights (DDP with AMP). DeepSpeed's own bf16/fp16
      at stage 0 is FP16_UnfusedOptimizer, which keeps the module in 16 bits (exports and init_from would read
      rounded weights) and runs one zero-gradient optimizer step at set-up (AdamW starts at step 1, weight decay
      applied once before training). With autocast the module is the fp32 master, gradients are fp32, fp16 gets
      torch's GradScaler (dynamic loss scaling), and gradients are all-reduced in fp32.
    - ZeRO-1/2/3 in bf16: bf16 module, fp32 master weights in the optimizer partitions. ZeRO-2/3 accumulate
      gradients in fp32 (`data_types.grad_accum_dtype`; bf16 accumulation is DeepSpeed's default, which it warns
      is numerically unsafe over many micro batches). ZeRO-1 keeps bf16 accumulation: DeepSpeed runs fp32
      accumulation at stage 1 only through its BF16_Optimizer, whose checkpoints its own zero_to_fp32 refuses
      ("is not a zero checkpoint"), so they could not be exported. (With one micro batch per step, as the
      recipes have on 32 GPUs, nothing accumulates.)
    - ZeRO-1/2/3 in fp16: fp16 module and gradients with dynamic loss scaling; DeepSpeed skips and counts the
      steps whose gradients overflow. Gradients accumulate in fp16 (loss-scaled), DeepSpeed's tested fp16 path.
    - ZeRO-1/2: `overlap_comm` (reduce gradient buckets while backward runs; off by default in 0.19.8) with
      buckets of BUCKET_ELEMENTS, so that a Swin-B's 88M gradients go in several reductions, not one at the end.
      ZeRO-3 overlaps by default.
    """
    t = cfg.train
    if t.zero_stage not in typing.get_args(ZeroStage):
        raise ValueError(
            f"train.zero_stage must be one of {', '.join(map(str, typing.get_args(ZeroStage)))}, not {t.zero_stage!r}"
        )
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_bucket_size=BUCKET_ELEMENTS,
            allgather_bucket_size=BUCKET_ELEMENTS,
        )
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW: ZeRO partitions any torch optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    if precision in LOW_PRECISION and autocast_stage(t.zero_stage):
        # an empty module list: no parameter is marked for 16-bit communication, so gradients reduce in fp32
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": LOW_PRECISION[precision],
            "lower_precision_safe_modules": [],
        }
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
        if t.zero_stage in (2, 3):
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        # V100: dynamic loss scaling; DeepSpeed skips (and counts) the steps whose gradients overflow
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return config


def autocast_stage(zero_stage: int) -> bool:
    """Whether 16-bit training at this ZeRO stage runs as torch autocast over fp32 weights (deepspeed_config)."""
    return zero_stage == 0


def deepspeed_skips_nonfinite(zero_stage: int, precision: str) -> bool:
    """Whether DeepSpeed itself skips an optimizer step whose gradients are not finite.

    Whether DeepSpeed itself skips (and counts) an optimizer step whose gradients are not finite, so that a
    non-finite loss needs no check of ours before the backward: ZeRO-1/2 check the global gradient norm in every
    precision (DeepSpeedZeroOptimizer), ZeRO-3 only in fp16; ZeRO-0 (autocast's
    GradScaler skips fp16 overflows but DeepSpeed does not count them) and ZeRO-3 in bf16/fp32 would apply them."""
    if zero_stage in (1, 2):
        return True
    return zero_stage == 3 and precision == "fp16"


def loss_scale(engine) -> float | None:
    """The current fp16 loss scale, or None (bf16, fp32); reading it syncs the host.

    The current fp16 loss scale: DeepSpeed's (ZeRO-1/2/3 optimizers) or autocast's GradScaler (ZeRO-0);
    None when there is none (bf16, fp32). Reading it syncs the host: call it at log time only."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    if engine.fp16_enabled():
        scale = getattr(engine.optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
        return float(scale) if scale is not None else None
    return None


def skipped_steps(engine) -> int:
    """The optimizer steps skipped so far (non-finite gradients, fp16 overflows).

    Optimizer steps skipped so far: DeepSpeed's count, or at ZeRO-0 fp16, where autocast's GradScaler skips
    overflowing steps without DeepSpeed counting them, the engine's steps minus the ones AdamW took (its `step`
    state; restored with the checkpoint like the engine's count). Call it at log time."""
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is None:
        return int(engine.skipped_steps)
    optimizer = engine.optimizer
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                return int(engine.global_steps - int(state["step"]))
    return int(engine.global_steps)  # no step taken yet
