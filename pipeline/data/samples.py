"""What both loader backends read: a batch's JPEGs, labels, planned crops and flips, sample names.

What both loader backends read: a batch's JPEG bytes and labels from the shard set, its planned crops and flips,
and the names of its samples for error messages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN  # noqa: F401  (re-exported)
from timm.data import IMAGENET_DEFAULT_STD as STD  # noqa: F401  (re-exported)

from data_prep.shardset.members import ImageSizeError, image_size
from swin_common.errors import UserError

from .augment_params import batch_rng, flips, random_resized_crop
from .order import EpochOrder
from .reader import ShardReader, last_batch_of_shards


class DataError(UserError, RuntimeError):
    """A sample the pipeline cannot use, named with its shard and key."""


class BatchSource:
    """Batch b of an epoch order: its samples' bytes, labels, crop boxes and flips, for one rank."""

    def __init__(self, cfg, reader: ShardReader, rank: int):
        self.cfg, self.reader, self.rank = cfg, reader, rank
        self._last_for: EpochOrder | None = None  # the order whose last batch per shard `_last` holds
        self._last: np.ndarray | None = None
        self.after_read: Callable[[int], None] | None = None  # with b + 1 once batch b is read (the read-ahead)

    @property
    def url(self) -> str:
        return self.reader.shard_set.url

    def batch_refs(self, order: EpochOrder, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch b's (shard, sample) pairs."""
        lo, hi = b * self.cfg.batch_size, min((b + 1) * self.cfg.batch_size, len(order))
        return order.shard[lo:hi], order.sample[lo:hi]

    def read_batch(self, order: EpochOrder, b: int) -> tuple[list[tuple[int, int]], list[bytes], np.ndarray]:
        """Batch b's refs, JPEG bytes and labels; padding entries of an evaluation order are labelled -1."""
        shards, samples = self.batch_refs(order, b)
        refs = list(zip(shards.tolist(), samples.tolist(), strict=True))
        data: list[bytes] = []
        read_labels: list[int] = []
        for shard, sample in refs:
            jpg, label = self.reader.read(shard, sample)
            data.append(jpg)
            read_labels.append(label)
        self.reader.release_finished(self._last_batches(order), b)
        if self.after_read is not None:
            self.after_read(b + 1)
        labels = np.asarray(read_labels, np.int64)
        if order.valid is not None:
            lo = b * self.cfg.batch_size
            labels[~order.valid[lo : lo + len(labels)]] = -1
        return refs, data, labels

    def _last_batches(self, order: EpochOrder) -> np.ndarray:
        if self._last is None or self._last_for is not order:
            self._last = last_batch_of_shards(order, self.cfg.batch_size, len(self.reader.sizes))
            self._last_for = order
        return self._last

    def crops(self, epoch: int, slot: int, jpegs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The crop boxes and flips of the micro batch in `slot`.

        The random-resized-crop boxes (x, y, w, h) and flips, from the images' header sizes (JPEG, PNG or WebP:
        the column is named jpg, the image may be any of them)."""
        sizes = []
        for jpg in jpegs:
            try:
                sizes.append(image_size(jpg))
            except ImageSizeError:
                sizes.append((1, 1))  # decoding it fails later, where the backend skips or names it
        widths, heights = np.array(sizes, np.int64).reshape(-1, 2).T
        rng = batch_rng(self.cfg.seed, epoch, slot, 0)
        boxes = random_resized_crop(widths, heights, rng, self.cfg.scale, self.cfg.ratio)
        return boxes, flips(len(widths), rng, self.cfg.hflip)

    def name(self, shard: int, sample: int) -> str:
        """The sample where its bytes are: the data store's URL (the shards' root), its shard and key."""
        return (
            f"{self.reader.shard_set.data_url}/{self.reader.shard_name(shard)} sample {self.reader.key(shard, sample)}"
        )
