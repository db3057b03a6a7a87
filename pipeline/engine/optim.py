"""Optimizer, LR schedule and the DeepSpeed config, from the run config.

- AdamW (torch's, built by timm's `create_optimizer_v2`): no weight decay on norms, biases and relative position
  bias tables (timm's `filter_bias_and_bn` plus the model's `no_weight_decay()` names). torch's optimizer, not
  DeepSpeed's FusedAdam/CPUAdam, so nothing is compiled on first run; ZeRO partitions it all the same.
- LR scaled with the global batch as the official recipe does: base_lr x global_batch / lr_batch_base.
- Per-optimizer-step linear warm-up, then cosine / linear / constant (timm's schedulers, warm-up as a prefix).
  The schedule is a pure function of the step: resuming needs only the step, which DeepSpeed's checkpoint holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler

from pipeline.config import RunConfig


@dataclass(frozen=True)
class StepPlan:
    """How the global batch is made and how many optimizer steps the run takes."""
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(cfg: RunConfig, world: int, micro_batches_per_epoch: int) -> StepPlan:
    t = cfg.train
    if t.global_batch % (t.micro_batch * world):
        fits = [w for w in range(1, t.global_batch // t.micro_batch + 1) if t.global_batch % (t.micro_batch * w) == 0]
        raise ValueError(f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch "
                         f"{t.micro_batch} x world size {world}: with micro batch {t.micro_batch} the world sizes "
                         f"that keep the global batch are {', '.join(map(str, fits[:12]))}"
                         f"{' ...' if len(fits) > 12 else ''}; or change train.micro_batch")
    accum = t.global_batch // (t.micro_batch * world)
    steps_per_epoch = micro_batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch holds {micro_batches_per_epoch} micro batches per rank, fewer than one "
                         f"optimizer step ({accum} micro batches): lower train.global_batch")
    total = max(1, round(cfg.schedule.epochs * steps_per_epoch))
    warmup = min(total - 1, round(cfg.schedule.warmup_epochs * steps_per_epoch))
    return StepPlan(t.micro_batch, accum, steps_per_epoch, total, warmup)


def scaled_lr(cfg: RunConfig, lr: float) -> float:
    return lr * cfg.train.global_batch / cfg.optim.lr_batch_base


def create_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return create_optimizer_v2(model, "adamw", lr=scaled_lr(cfg, o.base_lr), weight_decay=o.weight_decay,
                               betas=o.betas, eps=o.eps, filter_bias_and_bn=True)


def create_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, plan: StepPlan):
    """A timm scheduler stepped per optimizer step with `step_update(step)`."""
    s = cfg.schedule
    common = dict(warmup_t=plan.warmup_steps, warmup_lr_init=scaled_lr(cfg, s.warmup_lr), warmup_prefix=True,
                  t_in_epochs=False)
    decay_steps = max(1, plan.total_steps - plan.warmup_steps)
    if s.decay == "cosine":
        return CosineLRScheduler(optimizer, t_initial=decay_steps, lr_min=scaled_lr(cfg, s.min_lr), **common)
    if s.decay == "linear":
        return PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, lr_min=scaled_lr(cfg, s.min_lr), **common)
    if s.decay == "constant":
        return StepLRScheduler(optimizer, decay_t=10**12, decay_rate=1.0, **common)
    raise ValueError(f"schedule.decay must be cosine, linear or constant, not {s.decay!r}")


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # V100 has no bf16
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use fp32 or bf16")
    return precision


def deepspeed_config(cfg: RunConfig, plan: StepPlan, world: int, precision: str) -> dict:
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, not {t.zero_stage}")
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: ZeRO partitions any torch optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "bf16": {"enabled": precision == "bf16"},
        # V100: dynamic loss scaling; DeepSpeed skips (and counts) the steps whose gradients overflow
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }
    return config  # gradients accumulate in the training dtype (DeepSpeed's default; fp32 is ZeRO-1 only)
