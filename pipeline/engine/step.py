"""One micro batch through the engine, with no host round trip where DeepSpeed guards the weights.

One micro batch through the engine: forward, loss, backward, and (at the accumulation boundary) the step,
without a host round trip where DeepSpeed already guards the weights.

The loss stays on the device: a StepTally sums the finite losses and counts the non-finite ones there, and the
log step reads the sums once per log line. A non-finite loss never reaches the weights:

- where DeepSpeed skips an optimizer step whose gradients are not finite (ZeRO-1/2 in every precision, ZeRO-3
  in fp16: `optim.deepspeed_skips_nonfinite`), the backward runs unconditionally and DeepSpeed drops the whole
  step (counted in engine.skipped_steps). Only then, a rare event, does the loop read the tally to tell a
  non-finite loss from an fp16 overflow (`MicroResult.skipped`);
- elsewhere (ZeRO-0, ZeRO-3 in bf16/fp32) a finite-loss flag is reduced over the ranks before the backward (one
  small all-reduce and a host read per micro batch, on the loss's device) and a non-finite micro batch is dropped
  on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.engine.distributed import all_true


@dataclass
class MicroResult:
    dropped: bool  # non-finite loss on some rank, found before the backward: no backward on any rank
    stepped: bool  # this micro batch closed an optimizer step
    skipped: bool = False  # DeepSpeed skipped that optimizer step (non-finite gradients, or an fp16 overflow)
    guard_s: float = 0.0  # seconds in the finite-loss all-reduce before the backward (a wait for the other ranks)


class StepTally:
    """A log window's losses, summed on the device.

    A log window's losses, summed on the device (finite loss sum, finite count, non-finite count); the image
    count is the host's, which knows every batch's length."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.images = 0

    def add(self, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        loss = loss.detach().double()
        values = torch.stack([torch.where(finite, loss, torch.zeros_like(loss)), finite.double(), (~finite).double()])
        self.sums = values if self.sums is None else self.sums + values
        self.images += images

    def nonfinite(self) -> int:
        """Non-finite losses so far in this window (a host read: call it on rare events only)."""
        return 0 if self.sums is None else int(self.sums[2].item())

    def reset(self) -> None:
        self.sums, self.images = None, 0


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Soft targets (Mixup/CutMix, already smoothed) or hard labels with label smoothing."""
    logits = logits.float()
    if labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def micro_step(
    engine,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    tally: StepTally | None = None,
    guard_on_host: bool = True,
) -> MicroResult:
    """One micro batch forward and backward (dropped on every rank for a non-finite loss), stepping at a boundary.

    `guard_on_host`: DeepSpeed would apply non-finite gradients at this stage and precision
    (not optim.deepspeed_skips_nonfinite), so the finite check runs before the backward (the module's notes)."""
    tally = StepTally() if tally is None else tally
    loss = loss_fn(engine(images), labels, label_smoothing)
    finite = torch.isfinite(loss.detach())
    tally.add(loss, finite, len(images))
    guard_s = 0.0
    if guard_on_host:
        t0 = time.perf_counter()
        ok = all_true(finite)
        guard_s = time.perf_counter() - t0
        if not ok:
            return MicroResult(dropped=True, stepped=False, guard_s=guard_s)
    boundary = engine.is_gradient_accumulation_boundary()
    skipped_before = engine.skipped_steps
    engine.backward(loss)
    engine.step()
    return MicroResult(
        dropped=False, stepped=boundary, skipped=boundary and engine.skipped_steps > skipped_before, guard_s=guard_s
    )
