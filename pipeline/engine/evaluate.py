"""Evaluation on the val shards: loss, top-1, top-5, summed over every rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(engine, loader, device: torch.device) -> dict[str, float]:
    """Each rank reads its equal slice of the val split (ranks x slice may leave out world-1 samples)."""
    was_training = engine.training
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, samples
    for images, labels in loader:
        logits = engine(images.to(device)).float()
        labels = labels.to(logits.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(), hits[:, 0].sum().item(),
                              hits.any(dim=1).sum().item(), len(labels)], dtype=torch.float64)
    all_reduce_sum(sums)
    engine.train(was_training)
    n = max(sums[3].item(), 1)
    return {"val_loss": sums[0].item() / n, "val_top1": 100 * sums[1].item() / n, "val_top5": 100 * sums[2].item() / n,
            "val_samples": int(sums[3].item())}
