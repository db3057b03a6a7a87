"""The PyTorch backend: PIL decode, the planned crop/flip, timm's RandAugment, in DataLoader worker processes.

Workers take whole batches (worker k of K makes batches start+k, start+k+K, ...), and the DataLoader hands them
out in batch order, so the stream is the same for any number of workers. An undecodable sample is skipped and
counted (the batch comes out one short), never replaced.
"""
from __future__ import annotations

import gc
import io
import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .augment_params import batch_rng, eval_resize

log = logging.getLogger("pipeline.data")
_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
_STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


class _Batches(IterableDataset):
    def __init__(self, loader, order, start: int, end: int):
        self.loader, self.order, self.start, self.end = loader, order, start, end
        self.rand_augment = None
        cfg = loader.cfg
        if cfg.train and cfg.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            self.rand_augment = rand_augment_transform(
                cfg.rand_augment, {"translate_const": int(cfg.image_size * 0.45),
                                   "img_mean": tuple(round(255 * m) for m in _MEAN.flatten().tolist())})

    def __iter__(self):
        info = get_worker_info()
        k, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in range(self.start + k, self.end, workers):
            yield self.make(b)

    def make(self, b: int):
        loader, cfg = self.loader, self.loader.cfg
        from .loader import seeded

        refs, data, labels = loader.read_batch(self.order, b)
        if cfg.train:
            boxes, flip = loader.crops(b, data)
            sample_seeds = batch_rng(cfg.seed, loader.epoch, loader.rank, b, 2).integers(0, 2**62, len(data))
        images, keep, skipped = [], [], 0
        for i, jpg in enumerate(data):
            try:
                img = Image.open(io.BytesIO(jpg))
                img = img.convert("RGB")
            except (OSError, ValueError, SyntaxError) as e:
                skipped += 1
                log.warning("skipped %s: %s", loader.name(*refs[i]), e)
                continue
            if cfg.train:
                x, y, bw, bh = boxes[i].tolist()
                img = F.resized_crop(img, y, x, bh, bw, [cfg.image_size, cfg.image_size],
                                     interpolation=InterpolationMode.BICUBIC)
                if flip[i]:
                    img = F.hflip(img)
                if self.rand_augment is not None:  # timm's RandAugment draws from `random` and numpy's global RNG
                    with seeded(np.random.default_rng(int(sample_seeds[i]))):
                        img = self.rand_augment(img)
            else:
                img = F.resize(img, eval_resize(cfg.image_size, cfg.crop_pct), InterpolationMode.BICUBIC)
                img = F.center_crop(img, [cfg.image_size, cfg.image_size])
            tensor = F.pil_to_tensor(img).float().div_(255)
            images.append(tensor.sub_(_MEAN).div_(_STD))
            keep.append(i)
        return b, torch.stack(images), torch.from_numpy(labels[keep]), skipped


def _torch_batches(loader, order, start: int, end: int):
    dataset = _Batches(loader, order, start, end)
    workers = min(loader.cfg.workers, max(end - start, 0))
    if workers == 0:
        yield from dataset
        return
    dl = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=loader.device == "cuda",
                    multiprocessing_context="fork", persistent_workers=False)
    # The workers are forked: objects they inherit must never be finalised there (a DALI pipeline left over from
    # another loader hangs in its __del__ without its threads), so freeze the heap for the fork.
    gc.collect()
    gc.freeze()
    try:
        batches = iter(dl)
    finally:
        gc.unfreeze()
    for b, images, labels, skipped in batches:
        if loader.device == "cuda":
            images, labels = images.cuda(non_blocking=True), labels.cuda(non_blocking=True)
        yield b, images, labels, skipped
