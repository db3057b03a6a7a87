"""Which samples a rank reads in an epoch, in which order: a pure function of (seed, epoch, rank, world size).

Training: an epoch is one sequence G of the set's N samples that does not depend on the world size: the shards
permuted (seed, epoch), their samples laid end to end, shuffled within windows of `window` samples. G is cut
into micro batches of m samples, the "slots" 0, 1, 2, ...; rank r of W reads slots r, r + W, r + 2W, ... (its
j-th micro batch is slot j*W + r). So after every rank has read j micro batches, exactly the first j*W*m
samples of G are consumed, whatever W is, and the random draws of a micro batch (crops, flips, Mixup,
RandAugment) are keyed by its slot, not by the rank that reads it. A run that stops after c consumed samples
resumes on W' ranks at slot c / m (c is a whole number of global batches, so of W'*m), and its optimizer steps
see the same samples, with the same augmentations, as an uninterrupted run. The N mod (W*m) samples at the end
sit out this epoch (others next time); every rank gets the same number of micro batches, so none waits in a
collective. All ranks read the same stretch of G at a time: a node's ranks share the shards they need.

Evaluation (`pad=True`, no shuffle) counts every sample exactly once instead: rank r reads the r-th of W
contiguous slices of ceil(N / W) samples, the last ones padded with repeats marked invalid (`EpochOrder.valid`),
which the loader labels -1 and evaluation leaves out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochOrder:
    shard: np.ndarray  # int32, the shard of each sample this rank reads, in order
    sample: np.ndarray  # int32, the sample's position inside its shard
    valid: np.ndarray | None = None  # bool, False for padding (pad=True only); None: every entry is real
    # b -> the global slot of this rank's b-th batch (training); None: b itself
    slot_of_batch: Callable[[int], int] | None = None

    def __len__(self) -> int:
        return len(self.shard)

    def slot(self, b: int) -> int:
        return b if self.slot_of_batch is None else self.slot_of_batch(b)


def samples_per_rank(shard_sizes: list[int], world: int, pad: bool = False) -> int:
    """Entries each rank reads in an epoch: N // world, or with padding ceil(N / world)."""
    return -(-sum(shard_sizes) // world) if pad else sum(shard_sizes) // world


def epoch_sequence(
    shard_sizes: list[int], seed: int, epoch: int, window: int = 8192, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """G: (shard, sample) of every sample of the set, in this epoch's order; the same for every world size."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    perm = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    shard = np.repeat(perm, sizes[perm]).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes[perm])[:-1]])
    sample = (np.arange(len(shard)) - np.repeat(starts, sizes[perm])).astype(np.int32)
    n = len(shard)
    if shuffle and window > 1 and n:
        rng = np.random.default_rng([seed, epoch, 1])
        order = np.concatenate([start + rng.permutation(min(window, n - start)) for start in range(0, n, window)])
        shard, sample = shard[order], sample[order]
    return shard, sample


def epoch_order(
    shard_sizes: list[int],
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    window: int = 8192,
    shuffle: bool = True,
    pad: bool = False,
    batch: int = 1,
) -> EpochOrder:
    """This rank's entries of the epoch, in reading order.

    Training (`pad=False`): its micro batches of `batch`
    samples, slot j*world + rank of G for its j-th; evaluation (`pad=True`): its padded contiguous slice."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if pad and shuffle:
        raise ValueError("pad=True is for evaluation, in shard order (shuffle=False)")
    shard, sample = epoch_sequence(shard_sizes, seed, epoch, window, shuffle)
    if pad:
        n = samples_per_rank(shard_sizes, world, pad=True)
        lo, hi = min(rank * n, len(shard)), min((rank + 1) * n, len(shard))
        fill = n - (hi - lo)  # padding: repeats of the set's first sample, marked invalid
        valid = np.concatenate([np.ones(hi - lo, bool), np.zeros(fill, bool)])
        return EpochOrder(
            np.concatenate([shard[lo:hi], np.full(fill, shard[0], np.int32)]),
            np.concatenate([sample[lo:hi], np.full(fill, sample[0], np.int32)]),
            valid,
        )
    batches = len(shard) // (world * batch)
    # slot s holds G[s*batch:(s+1)*batch]; this rank's slots are rank, rank + world, ...
    starts = (np.arange(batches, dtype=np.int64) * world + rank) * batch
    index = (starts[:, None] + np.arange(batch)).reshape(-1)
    return EpochOrder(shard[index], sample[index], None, _Slots(world, rank))


@dataclass(frozen=True)
class _Slots:
    """b -> b*world + rank (a picklable callable: DataLoader workers receive the order)."""

    world: int
    rank: int

    def __call__(self, b: int) -> int:
        return b * self.world + self.rank
