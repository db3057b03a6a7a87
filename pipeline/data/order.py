"""Which samples a rank reads in an epoch, in which order: a pure function of (seed, epoch, rank, world size).

An epoch permutes the shards (same permutation on every rank), lays their samples end to end, gives rank r the
r-th of `world` equal contiguous slices (the N mod world samples at the end sit out this epoch; others next
time), and shuffles that slice within windows of `window` samples. Evaluation (`pad=True`, no shuffle) counts
every sample exactly once instead: the slices are ceil(N / world) long and the last ones are padded with
repeats marked invalid (`EpochOrder.valid`), which the loader labels -1 and evaluation leaves out. Contiguous slices keep a rank's reads on a
few shards at a time, so a bounded S3 cache can hold them; equal slices give every rank the same number of
batches however the shards divide, so no rank waits forever in a collective. Since the order is a function,
the loader's resume state is just (epoch, position).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochOrder:
    shard: np.ndarray  # int32, the shard of each sample this rank reads, in order
    sample: np.ndarray  # int32, the sample's position inside its shard
    valid: np.ndarray | None = None  # bool, False for padding (pad=True only); None: every entry is real

    def __len__(self) -> int:
        return len(self.shard)


def samples_per_rank(shard_sizes: list[int], world: int, pad: bool = False) -> int:
    """Entries each rank reads in an epoch: N // world, or with padding ceil(N / world)."""
    return -(-sum(shard_sizes) // world) if pad else sum(shard_sizes) // world


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, rank: int, world: int,
                window: int = 8192, shuffle: bool = True, pad: bool = False) -> EpochOrder:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if pad and shuffle:
        raise ValueError("pad=True is for evaluation, in shard order (shuffle=False)")
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    perm = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    shard = np.repeat(perm, sizes[perm]).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes[perm])[:-1]])
    sample = (np.arange(len(shard)) - np.repeat(starts, sizes[perm])).astype(np.int32)
    if pad:
        n = samples_per_rank(shard_sizes, world, pad=True)
        lo, hi = min(rank * n, len(shard)), min((rank + 1) * n, len(shard))
        fill = n - (hi - lo)  # padding: repeats of the set's first sample, marked invalid
        valid = np.concatenate([np.ones(hi - lo, bool), np.zeros(fill, bool)])
        return EpochOrder(np.concatenate([shard[lo:hi], np.full(fill, shard[0], np.int32)]),
                          np.concatenate([sample[lo:hi], np.full(fill, sample[0], np.int32)]), valid)
    n = len(shard) // world
    shard, sample = shard[rank * n:(rank + 1) * n], sample[rank * n:(rank + 1) * n]
    if shuffle and window > 1:
        rng = np.random.default_rng([seed, epoch, rank, 1])
        order = np.concatenate([start + rng.permutation(min(window, n - start)) for start in range(0, n, window)]
                               or [np.zeros(0, dtype=np.int64)])
        shard, sample = shard[order], sample[order]
    return EpochOrder(shard, sample)
