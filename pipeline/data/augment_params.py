"""Per-sample augmentation parameters drawn on the host: the same on any backend and number of ranks.

Per-sample random augmentation parameters drawn on the host from a per-batch seed, so that both backends
crop and flip the same way and a resumed run (on any number of ranks) draws exactly what the uninterrupted one
drew."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch


def batch_rng(seed: int, epoch: int, slot: int, stream: int) -> np.random.Generator:
    """The random generator of one micro batch, keyed by its slot in the epoch, not by its rank.

    The draws of one micro batch, keyed by its global slot in the epoch (pipeline.data.order), not by the rank
    that reads it: the same batch gets the same crops, flips and Mixup on any number of ranks."""
    return np.random.default_rng([seed, epoch, slot, stream])


def random_resized_crop(
    widths: np.ndarray,
    heights: np.ndarray,
    rng: np.random.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    attempts: int = 10,
) -> np.ndarray:
    """One random-resized-crop box per image of these sizes, drawn as torchvision draws them.

    (n, 4) boxes x, y, w, h with torchvision's RandomResizedCrop semantics: up to 10 tries of an area in
    `scale` and a log-uniform aspect ratio, else the centred crop of the clamped ratio."""
    n = len(widths)
    boxes = np.zeros((n, 4), np.int64)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    area_frac = rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], (n, attempts)))
    pos = rng.uniform(0, 1, (n, attempts, 2))
    for i in range(n):
        W, H = int(widths[i]), int(heights[i])
        for a in range(attempts):
            area = W * H * area_frac[i, a]
            w = int(round(math.sqrt(area * aspect[i, a])))
            h = int(round(math.sqrt(area / aspect[i, a])))
            if 0 < w <= W and 0 < h <= H:
                x = min(int(pos[i, a, 0] * (W - w + 1)), W - w)
                y = min(int(pos[i, a, 1] * (H - h + 1)), H - h)
                boxes[i] = (x, y, w, h)
                break
        else:
            in_ratio = W / H
            if in_ratio < ratio[0]:
                w, h = W, int(round(W / ratio[0]))
            elif in_ratio > ratio[1]:
                w, h = int(round(H * ratio[1])), H
            else:
                w, h = W, H
            boxes[i] = ((W - w) // 2, (H - h) // 2, w, h)
    return boxes


def flips(n: int, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    return rng.uniform(0, 1, n) < p


def eval_resize(size: int, crop_pct: float) -> int:
    """Shorter side before the centre crop, as timm computes it."""
    return int(math.floor(size / crop_pct))


def torch_generators(device: str | torch.device = "cpu") -> list[torch.Generator]:
    """The torch generators that draws on `device` use: the CPU one, and that GPU's.

    The torch generators a block running on `device` draws from: the CPU one, plus that CUDA device's own
    (timm's RandomErasing draws its noise on the batch's device)."""
    device = torch.device(device)
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(
            torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        )
    return generators


@contextlib.contextmanager
def seeded(rng: np.random.Generator, generators: list[torch.Generator] | None = None):
    """A context in which timm's draws from the global generators come from `rng`; those generators restored after.

    timm's RandAugment, Mixup and RandomErasing draw from the global random/numpy/torch generators: seed them
    for one batch (or sample) and put every one of them back afterwards.

    Only `generators` (default: the CPU one; `torch_generators(device)` adds a CUDA device's) are seeded and
    restored, never through torch.manual_seed, which would also reseed every CUDA device's generator and so
    replace each rank's drop-path stream on a GPU."""
    generators = [torch.default_generator] if generators is None else generators
    seeds = rng.integers(0, 2**31, 3)
    saved = random.getstate(), np.random.get_state(), [g.get_state() for g in generators]
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    for g in generators:
        g.manual_seed(int(seeds[2]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        for g, state in zip(generators, saved[2], strict=True):
            g.set_state(state)
