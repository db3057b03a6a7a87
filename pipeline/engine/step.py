"""One micro batch through the engine: forward, loss, backward, and (at the accumulation boundary) the step.

A non-finite loss on any rank drops that micro batch on every rank (no backward, so no NaN reaches the
gradients or the optimizer state) and is counted; the loop stops the run when it keeps happening.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.engine.distributed import all_true


@dataclass
class MicroResult:
    loss: float  # this rank's loss (nan when dropped)
    dropped: bool  # non-finite loss on some rank: no backward on any
    stepped: bool  # this micro batch closed an optimizer step


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Soft targets (Mixup/CutMix, already smoothed) or hard labels with label smoothing."""
    logits = logits.float()
    if labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank."""
    return all_true(bool(torch.isfinite(loss.detach()).all()))


def micro_step(engine, images: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> MicroResult:
    loss = loss_fn(engine(images), labels, label_smoothing)
    if not all_finite(loss):
        return MicroResult(float("nan"), dropped=True, stepped=False)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    engine.step()
    return MicroResult(loss.item(), dropped=False, stepped=boundary)
