"""create_loader: (images, labels) torch batches of a shard set for one rank, on DALI or on PyTorch.

Both backends read the same samples in the same order (pipeline.data.order) with the same crops and flips
(pipeline.data.augment_params, drawn per batch from (seed, epoch, rank, batch)), then the batch-level
augmentations (Mixup/CutMix with label smoothing, random erasing) run on the produced batch, seeded the same
way. The loader's whole state is therefore (epoch, position): a checkpoint stores `state_dict()`, and a loader
made with that state yields exactly the batches an uninterrupted one would have.

Batch contract: images float NCHW (normalised with ImageNet mean/std) in `dtype`; labels int64 (N,), or float
(N, classes) soft targets when Mixup/CutMix is on.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import simplejpeg
import torch

from .augment_params import batch_rng, flips, random_resized_crop
from .order import epoch_order, samples_per_rank
from .cache import ShardCache
from .reader import ShardReader
from .shard_checks import open_shard_set

log = logging.getLogger("pipeline.data")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A sample the pipeline cannot use, named with its shard and key."""


@dataclass
class LoaderConfig:
    shards: str  # shard set folder or s3://bucket/prefix
    split: str = "train"
    train: bool = True  # random crops, flips and augmentations; else resize + centre crop
    batch_size: int = 64
    image_size: int = 224
    crop_pct: float = 0.875  # eval: resize the shorter side to size / crop_pct, then centre crop
    backend: str = "auto"  # auto (dali where it imports) | dali | torch
    device: str = "auto"  # auto | cpu | cuda: where DALI decodes (mixed) and where batches land
    workers: int = 2  # DALI threads / DataLoader worker processes
    seed: int = 0
    shuffle_window: int = 8192
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str | None = None  # timm's "rand-m9-mstd0.5-inc1"; DALI runs its own policy (see README)
    mixup: float = 0.0  # Mixup alpha (paper: 0.8)
    cutmix: float = 0.0  # CutMix alpha (paper: 1.0)
    label_smoothing: float = 0.1  # applied with Mixup/CutMix
    random_erasing: float = 0.0  # probability (paper: 0.25)
    max_bad_shards: int = 0
    dtype: str = "float32"
    cache_dir: str = "/tmp/swin-shard-cache"  # S3 shards are copied here (local sets are read in place)
    cache_bytes: int = 64 << 30  # at most this much; least recently used shards are evicted


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


class ShardLoader:
    def __init__(self, cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.shard_set = open_shard_set(cfg.shards, cfg.split, cfg.max_bad_shards)
        self.reader = ShardReader(self.shard_set, ShardCache(cfg.cache_dir, cfg.cache_bytes))
        self.backend = cfg.backend if cfg.backend != "auto" else ("dali" if dali_available() else "torch")

        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, cfg.dtype)
        self.epoch, self.position, self.skipped = 0, 0, 0
        self.dali_pipe, self._dali_checkpoint = None, None  # DALI's RNG state, when its operators draw
        if state:
            self.load_state_dict(state)
        self._mixup = None
        if cfg.train and (cfg.mixup > 0 or cfg.cutmix > 0):
            from timm.data import Mixup

            self._mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                                num_classes=self.shard_set.num_classes)
        self._erase = None
        if cfg.train and cfg.random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(cfg.random_erasing, mode="pixel", device=self.device)

    # -- state ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch: the same on every rank."""
        per_rank = samples_per_rank(self.reader.sizes, self.world)
        return per_rank // self.cfg.batch_size if self.cfg.train else -(-per_rank // self.cfg.batch_size)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.cfg.seed, "world": self.world,
                 "rank": self.rank, "batch_size": self.cfg.batch_size}
        if self.position > 0 and self._dali_draws():
            checkpoint = self.dali_pipe.checkpoint() if self.dali_pipe is not None else self._dali_checkpoint
            if checkpoint is not None:
                state["dali_checkpoint"] = base64.b64encode(checkpoint).decode()
        return state

    def _dali_draws(self) -> bool:
        """Whether DALI's own random operators (RandAugment) shape the batches."""
        return self.backend == "dali" and self.cfg.train and bool(self.cfg.rand_augment)

    def keep_dali_state(self, pipe) -> None:
        """Called when iteration stops mid-epoch: the state to resume from, before the pipeline goes."""
        self._dali_checkpoint = pipe.checkpoint() if self._dali_draws() else None

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world", "batch_size"):
            mine = {"seed": self.cfg.seed, "world": self.world, "batch_size": self.cfg.batch_size}[key]
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]}, this run has {mine}: "
                                 f"an exact resume needs the same seed, world size and batch size")
        self.epoch, self.position = state["epoch"], state["position"]
        if "dali_checkpoint" in state:
            self._dali_checkpoint = base64.b64decode(state["dali_checkpoint"])

    def take_dali_checkpoint(self) -> bytes | None:
        """The DALI state to resume from, once: a later epoch starts fresh."""
        checkpoint, self._dali_checkpoint = self._dali_checkpoint, None
        return checkpoint if self.position > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._dali_checkpoint = epoch, 0, None

    # -- batches -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        order = epoch_order(self.reader.sizes, self.cfg.seed, self.epoch, self.rank, self.world,
                            self.cfg.shuffle_window, shuffle=self.cfg.train)
        produce = _dali_batches if self.backend == "dali" else _torch_batches
        for b, images, labels, skipped in produce(self, order, self.position, len(self)):
            self.skipped += skipped
            images, labels = self._batch_augment(b, images.to(self.dtype), labels)
            self.position = b + 1
            yield images, labels
        self.epoch, self.position = self.epoch + 1, 0

    def batch_refs(self, order, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch b's (shard, sample) pairs."""
        lo, hi = b * self.cfg.batch_size, min((b + 1) * self.cfg.batch_size, len(order))
        return order.shard[lo:hi], order.sample[lo:hi]

    def read_batch(self, order, b: int) -> tuple[list[tuple[int, int]], list[bytes], np.ndarray]:
        shards, samples = self.batch_refs(order, b)
        refs = list(zip(shards.tolist(), samples.tolist(), strict=True))
        data, labels = [], []
        for shard, sample in refs:
            jpg, label = self.reader.read(shard, sample)
            data.append(jpg)
            labels.append(label)
        return refs, data, np.asarray(labels, np.int64)

    def crops(self, b: int, jpegs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Batch b's random-resized-crop boxes (x, y, w, h) and flips, from the JPEGs' header sizes."""
        sizes = []
        for jpg in jpegs:
            try:
                sizes.append(jpeg_size(jpg))
            except ValueError:
                sizes.append((1, 1))  # decoding it fails later, where the backend skips or names it
        widths, heights = np.array(sizes, np.int64).reshape(-1, 2).T
        rng = batch_rng(self.cfg.seed, self.epoch, self.rank, b, 0)
        boxes = random_resized_crop(widths, heights, rng, self.cfg.scale, self.cfg.ratio)
        return boxes, flips(len(widths), rng, self.cfg.hflip)

    def name(self, shard: int, sample: int) -> str:
        return f"{self.shard_set.url}/{self.reader.shard_name(shard)} sample {self.reader.key(shard, sample)}"

    def _batch_augment(self, b: int, images: torch.Tensor, labels: torch.Tensor):
        if self._mixup is None and self._erase is None:
            return images, labels
        with seeded(batch_rng(self.cfg.seed, self.epoch, self.rank, b, 1)):
            if self._mixup is not None:
                if len(images) % 2:  # timm's batch Mixup pairs samples; a batch short of a skipped one drops one
                    images, labels = images[:-1], labels[:-1]
                images, labels = self._mixup(images, labels)
            if self._erase is not None:
                images = self._erase(images)
        return images, labels


@contextlib.contextmanager
def seeded(rng: np.random.Generator):
    """timm's Mixup and RandomErasing draw from the global random/numpy/torch generators: seed them for one
    batch and put them back afterwards."""
    seeds = rng.integers(0, 2**31, 3)
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    torch.manual_seed(int(seeds[2]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


def jpeg_size(data: bytes) -> tuple[int, int]:
    height, width, _colorspace, _sub = simplejpeg.decode_jpeg_header(data)
    return width, height


def create_loader(cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict | None = None) -> ShardLoader:
    """The loader factory (timm style): one config, this rank's place in the world, an optional resume state."""
    return ShardLoader(cfg, rank, world, state)


from .dali_backend import _dali_batches  # noqa: E402  (the backends use ShardLoader's helpers)
from .torch_backend import _torch_batches  # noqa: E402
