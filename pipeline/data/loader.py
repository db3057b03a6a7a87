"""create_loader: (images, labels) torch batches of a shard set for one rank, on DALI or on PyTorch.

Both backends read the same samples in the same order (pipeline.data.order) with the same crops and flips
(pipeline.data.augment_params, drawn per batch from (seed, epoch, rank, batch)), then the batch-level
augmentations (Mixup/CutMix with label smoothing, random erasing) run on the produced batch, seeded the same
way, keyed by each micro batch's global slot. The loader's whole state is therefore (epoch, position): a
checkpoint stores `state_dict()`, and a loader made with that state yields exactly the batches an uninterrupted
one would have; on another number of ranks it resumes from the samples consumed (pipeline.data.order).

Batch contract: images float NCHW (normalised with ImageNet mean/std) in `dtype`; labels int64 (N,), or float
(N, classes) soft targets when Mixup/CutMix is on. An evaluation loader (train=False) gives every rank the same
number of batches and every sample to exactly one rank: its padding entries have label -1 (leave them out).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from data_prep.shardset.reader import open_shard_set
from data_prep.shardset.store import LocalStore
from pipeline.config import Backend, ConfigError

from .augment_params import batch_rng, seeded, torch_generators
from .backend import create_backend
from .cache import ShardCache
from .order import epoch_order, samples_per_rank
from .readahead import ReadAhead
from .reader import ShardReader
from .samples import BatchSource, DataError  # noqa: F401  (DataError: what the loader raises)

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    shards: str  # shard set folder or s3://bucket/prefix
    split: str = "train"
    train: bool = True  # random crops, flips and augmentations; else resize + centre crop
    batch_size: int = 64
    image_size: int = 224
    crop_pct: float = 0.875  # eval: resize the shorter side to size / crop_pct, then centre crop
    backend: Backend = "auto"  # auto (dali where it imports) | dali | torch
    device: str = "auto"  # auto | cpu | cuda: where DALI decodes (mixed) and where batches land
    workers: int = 2  # DALI threads (at least one) / DataLoader worker processes (0: in the loader's process)
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
    cache_bytes: int = 64 << 30  # per node, shared by its ranks; least recently used shards not in use go first
    read_ahead: int = 4  # S3 shards each rank keeps fetched ahead of where it reads (0: none)


class ShardLoader:
    def __init__(self, cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        cache = ShardCache(cfg.cache_dir, cfg.cache_bytes)
        self.shard_set = open_shard_set(cfg.shards, cfg.split, cfg.max_bad_shards, cache)
        self.reader = ShardReader(self.shard_set, cache)
        self._ahead: ReadAhead | None = None  # the read-ahead of the epoch under way (S3 sets)
        self.source = BatchSource(cfg, self.reader, rank)
        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = create_backend(cfg.backend, cfg, self.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.epoch, self.position, self.skipped = 0, 0, 0
        if state:
            self.load_state_dict(state)
        self._mixup = None
        if cfg.train and (cfg.mixup > 0 or cfg.cutmix > 0):
            self._mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.shard_set.num_classes,
            )
        self._erase = None
        if cfg.train and cfg.random_erasing > 0:
            self._erase = RandomErasing(cfg.random_erasing, mode="pixel", device=self.device)

    # -- state ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch: the same on every rank."""
        per_rank = samples_per_rank(self.reader.sizes, self.world, pad=not self.cfg.train)
        return per_rank // self.cfg.batch_size if self.cfg.train else -(-per_rank // self.cfg.batch_size)

    def state_dict(self) -> dict:
        """Where the loader is in its epoch, for a checkpoint's rank file.

        (epoch, position), and `consumed`: the samples of the epoch's sequence every rank together has read,
        which a loader on another number of ranks resumes from."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self.consumed(),
            "seed": self.cfg.seed,
            "world": self.world,
            "rank": self.rank,
            "batch_size": self.cfg.batch_size,
            **self.backend.state_dict(self.position),
        }

    def s3_stats(self) -> dict[str, int]:
        """The node cache's hits and misses and the read-ahead depth for a set on S3; {} for a local set.

        For a set on S3: the node cache's hits and misses so far (this rank and its workers) and the shards
        read ahead now; {} for a local set."""
        if isinstance(self.reader.store, LocalStore):
            return {}
        ahead = self._ahead
        return {**self.reader.cache.stats(), "read_ahead_depth": ahead.depth() if ahead is not None else 0}

    def consumed(self) -> int:
        return self.position * self.world * self.cfg.batch_size

    def load_state_dict(self, state: dict) -> None:
        """Puts the loader where a saved state says, on this world size or another.

        The same world size and micro batch: exactly where it stopped (the backend's own state included).
        Another world size or micro batch (an elastic resume): the epoch's sequence from the `consumed` sample
        on, split over this world; DALI's own RNG then restarts from a seed of where it starts."""
        if state["seed"] != self.cfg.seed:
            raise ConfigError(f"loader state was saved with seed={state['seed']}, this run has {self.cfg.seed}")
        self.epoch = state["epoch"]
        if (state["world"], state["batch_size"]) == (self.world, self.cfg.batch_size):
            self.position = state["position"]
            self.backend.load_state_dict(state)
            return
        consumed = state.get("consumed", state["position"] * state["world"] * state["batch_size"])
        per_step = self.world * self.cfg.batch_size
        if consumed % per_step:
            raise ConfigError(
                f"loader state: {consumed} samples of epoch {self.epoch} consumed, not a whole number "
                f"of {self.world} ranks x {self.cfg.batch_size} micro batch: resume from a checkpoint "
                f"taken at an optimizer step"
            )
        self.position = consumed // per_step

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self.backend.new_epoch()

    # -- batches -------------------------------------------------------------------------------------------
    def __iter__(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        order = epoch_order(
            self.reader.sizes,
            self.cfg.seed,
            self.epoch,
            self.rank,
            self.world,
            self.cfg.shuffle_window,
            shuffle=self.cfg.train,
            pad=not self.cfg.train,
            batch=self.cfg.batch_size if self.cfg.train else 1,
        )
        ahead = None
        if self.cfg.read_ahead > 0 and not isinstance(self.reader.store, LocalStore):
            ahead = ReadAhead(self.reader, order, self.cfg.batch_size, self.cfg.read_ahead, self.position)
            if self.backend.reads_ahead_here:
                self.source.after_read = ahead.advance
        self._ahead = ahead
        try:
            for b, images, labels, skipped in self.backend.batches(
                self.source, order, self.epoch, self.position, len(self)
            ):
                self.skipped += skipped
                images, labels = self._batch_augment(order.slot(b), images.to(self.dtype), labels)
                self.position = b + 1
                if ahead is not None:
                    ahead.advance(b + 1)
                yield images, labels
        finally:
            if ahead is not None:
                self.source.after_read = None
                ahead.close()
            self._ahead = None
            self.reader.close()
        self.epoch, self.position = self.epoch + 1, 0
        self.backend.new_epoch()

    def _batch_augment(self, slot: int, images: torch.Tensor, labels: torch.Tensor):
        if self._mixup is None and self._erase is None:
            return images, labels
        # the generators of the loader's device: RandomErasing draws its noise there (device=self.device), whatever
        # device a backend handed the batch on
        with seeded(batch_rng(self.cfg.seed, self.epoch, slot, 1), torch_generators(self.device)):
            if self._mixup is not None:
                if len(images) % 2:  # timm's batch Mixup pairs samples; a batch short of a skipped one drops one
                    images, labels = images[:-1], labels[:-1]
                images, labels = self._mixup(images, labels)
            if self._erase is not None:
                images = self._erase(images.to(self.device))
        return images, labels


def create_loader(cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict | None = None) -> ShardLoader:
    """The loader factory (timm style): one config, this rank's place in the world, an optional resume state."""
    return ShardLoader(cfg, rank, world, state)
