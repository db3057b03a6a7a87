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
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from swin_common.signals import ignore_stop_signals

from .augment_params import batch_rng, seeded
from .eval_transform import eval_transform
from .samples import MEAN, STD

log = logging.getLogger(__name__)
_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


class TorchBackend:
    """No state of its own: every draw is a function of (seed, epoch, rank, batch)."""

    name = "torch"
    reads_ahead_here = False  # in its workers (forked processes) or, without workers, as batches are handed out

    def __init__(self, cfg, device: str):
        self.cfg, self.device = cfg, device

    def batches(self, source, order, epoch: int, start: int, end: int):
        return _torch_batches(self, source, order, epoch, start, end)

    def state_dict(self, position: int) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def new_epoch(self) -> None:
        pass


class _Batches(IterableDataset):
    def __init__(self, source, order, epoch: int, start: int, end: int):
        self.source, self.order, self.epoch, self.start, self.end = source, order, epoch, start, end
        self.rand_augment = None
        cfg = source.cfg
        if cfg.train and cfg.rand_augment:
            self.rand_augment = rand_augment_transform(
                cfg.rand_augment,
                {"translate_const": int(cfg.image_size * 0.45), "img_mean": tuple(round(255 * m) for m in MEAN)},
            )
        self.eval_transform = None if cfg.train else eval_transform(cfg.image_size, cfg.crop_pct)

    def __iter__(self):
        info = get_worker_info()
        k, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in range(self.start + k, self.end, workers):
            yield self.make(b)

    def make(self, b: int):
        source, cfg = self.source, self.source.cfg
        refs, data, labels = source.read_batch(self.order, b)
        if cfg.train:
            slot = self.order.slot(b)
            boxes, flip = source.crops(self.epoch, slot, data)
            sample_seeds = batch_rng(cfg.seed, self.epoch, slot, 2).integers(0, 2**62, len(data))
        images, keep, skipped = [], [], 0
        for i, jpg in enumerate(data):
            try:
                img: Image.Image = Image.open(io.BytesIO(jpg))
                img = img.convert("RGB")
            except (OSError, ValueError, SyntaxError) as e:
                skipped += 1
                log.warning("skipped %s: %s", source.name(*refs[i]), e)
                continue
            if cfg.train:
                x, y, bw, bh = boxes[i].tolist()
                img = F.resized_crop(
                    img, y, x, bh, bw, [cfg.image_size, cfg.image_size], interpolation=InterpolationMode.BICUBIC
                )
                if flip[i]:
                    img = F.hflip(img)
                if self.rand_augment is not None:  # timm's RandAugment draws from `random` and numpy's global RNG
                    with seeded(np.random.default_rng(int(sample_seeds[i]))):
                        img = self.rand_augment(img)
                tensor = F.pil_to_tensor(img).float().div_(255)
                images.append(tensor.sub_(_MEAN).div_(_STD))
            else:
                assert self.eval_transform is not None  # built in __init__ for an evaluation (cfg.train false)
                images.append(self.eval_transform(img))
            keep.append(i)
        return b, torch.stack(images), torch.from_numpy(labels[keep]), skipped


def _torch_batches(backend: TorchBackend, source, order, epoch: int, start: int, end: int):
    dataset = _Batches(source, order, epoch, start, end)
    workers = min(backend.cfg.workers, max(end - start, 0))
    if workers == 0:  # in this process; batches go to the loader's device all the same
        for b, images, labels, skipped in dataset:
            if backend.device == "cuda":
                images, labels = images.pin_memory().cuda(non_blocking=True), labels.cuda(non_blocking=True)
            yield b, images, labels, skipped
        return
    dl = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=backend.device == "cuda",
        multiprocessing_context="fork",
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )
    # The workers are forked: objects they inherit must never be finalised there (a DALI pipeline left over from
    # another loader hangs in its __del__ without its threads), so freeze the heap for the fork.
    gc.collect()
    gc.freeze()
    try:
        batches = iter(dl)
    finally:
        gc.unfreeze()
    for b, images, labels, skipped in batches:
        if backend.device == "cuda":
            images, labels = images.cuda(non_blocking=True), labels.cuda(non_blocking=True)
        yield b, images, labels, skipped
