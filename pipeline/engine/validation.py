"""Evaluation on the val shards: loss, top-1, top-5 over every val sample exactly once, whatever the world size.

The val loader gives every rank the same number of batches (ZeRO-3 needs every rank in every forward) and every
sample to exactly one rank; its padding entries carry label -1 and are left out here. The sums stay on the
batch's device until one all-reduce at the end (NCCL on GPUs), so no batch waits for a GPU -> CPU copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(engine, loader, device: torch.device, between_batches=None) -> dict[str, float]:
    """Loss, top-1 and top-5 of the model over the loader, summed over every rank; the engine's mode kept.

    `between_batches`: called on every rank after each batch (the stop check: it may raise, ending the
    evaluation on every rank at the same batch)."""
    was_training = engine.training
    engine.eval()
    sums = None  # loss sum, top-1 hits, top-5 hits, samples
    batches = iter(loader)
    try:
        for images, labels in batches:
            logits = engine(images.to(device, non_blocking=True)).float()
            labels = labels.to(logits.device, non_blocking=True)
            if sums is None:
                sums = torch.zeros(4, dtype=torch.float64, device=logits.device)
            sums += batch_sums(logits, labels)
            if between_batches is not None:
                between_batches()
    finally:
        if hasattr(batches, "close"):
            batches.close()
        engine.train(was_training)
    if sums is None:  # no val batch on this rank (every rank has the same count, so none has any)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    total = sums.tolist()
    n = max(total[3], 1)
    return {
        "val_loss": total[0] / n,
        "val_top1": 100 * total[1] / n,
        "val_top5": 100 * total[2] / n,
        "val_samples": int(total[3]),
    }


def batch_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One batch's loss sum, top-1 and top-5 hits and sample count, padding left out, with no host sync.

    (loss sum, top-1 hits, top-5 hits, samples) of one batch, padding entries (label -1) masked out with
    arithmetic: boolean-mask indexing or a test of the count would each wait for the GPU once per batch."""
    real = labels >= 0
    safe = labels.clamp(min=0)
    loss = F.cross_entropy(logits, safe, reduction="none")
    hits = (logits.topk(min(5, logits.shape[1]), dim=1).indices == safe[:, None]) & real[:, None]
    return torch.stack(
        [
            torch.where(real, loss, torch.zeros_like(loss)).sum().double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            real.sum().double(),
        ]
    )
