"""The deterministic shard plan: which item goes to which split and shard, and which task writes which shard.

Everything is a pure function of the listing and the options, so every Slurm array task computes the same plan
on its own and writes only its share; no coordination, and a rerun or a different number of tasks or workers
gives the same shards. Order comes from a keyed hash of (seed, item) rather than an RNG stream, so one item's
place never depends on the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from swin_common.errors import UserError

from .sources import Item, Listing

SPLITS = ("train", "val")
RECORDS_DIR = "_prep/done"  # one completion record per finished shard
T = TypeVar("T")


class PlanError(UserError, ValueError):
    """Raised when a prep job cannot go as asked.

    A prep job that cannot go as asked: its task share, or options that differ from those its output folder was
    begun with."""


@dataclass(frozen=True, eq=False)
class ShardSpec:
    split: str
    index: int
    rows: np.ndarray  # int64: the listing's rows this shard holds, in order
    listing: Listing

    @property
    def items(self) -> tuple[Item, ...]:
        """The shard's images as Items (built when the shard is written: a thousand, not 14M)."""
        return tuple(self.listing.item(int(r)) for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def index_name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.idx"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/{self.split}-{self.index:06d}.json"


def ranks(listing: Listing, seed: int, purpose: str) -> np.ndarray:
    """Each row's keyed hash of (seed, purpose, path): the plan's stable order for `purpose`.

    Per row, the keyed hash of (seed, purpose, path) as an unsigned int: sorting by it is sorting by the
    8-byte digest, as the plan always has (the plan of a source does not change with this version)."""
    prefix = f"{seed}:{purpose}:".encode()
    out = bytearray(8 * len(listing))
    for i in range(len(listing)):
        out[8 * i : 8 * i + 8] = hashlib.blake2b(prefix + listing.path_bytes(i), digest_size=8).digest()
    return np.frombuffer(out, ">u8")  # a view of the bytearray, not a copy


def split_holdout(listing: Listing, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows for train and for val: a per-class holdout, chosen by hash.

    Rows for train and for val: per class, the `per_class` rows ranked first by the hash go to val; a class
    always keeps at least one training image. Both in (synset, rank) order."""
    if per_class <= 0:
        return np.arange(len(listing)), np.zeros(0, np.int64)
    order = np.lexsort((ranks(listing, seed, "holdout"), listing.syn))  # stable: ties keep listing order
    syn = listing.syn[order]
    counts = np.bincount(syn, minlength=len(listing.synsets))
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(order)) - group_start[syn]
    to_val = position < np.minimum(per_class, counts - 1)[syn]
    return order[~to_val], order[to_val]


def shuffle(rows: np.ndarray, order_rank: np.ndarray) -> np.ndarray:
    return rows[np.argsort(order_rank[rows], kind="stable")]


def chunk(rows: np.ndarray, sizes: np.ndarray, max_samples: int | None, max_bytes: int | None) -> list[np.ndarray]:
    """The rows cut into shards, each under the sample and the byte limit.

    Consecutive runs of at most max_samples rows and at most max_bytes source bytes (a single bigger item
    gets a shard of its own). Byte limits count source bytes, so the plan is known before any decode."""
    if not max_bytes:
        step = max_samples or max(len(rows), 1)
        return [rows[i : i + step] for i in range(0, len(rows), step)]
    cuts, count, size, i, in_order, block = [], 0, 0, 0, sizes[rows], 1 << 20
    for start in range(0, len(rows), block):  # a block of Python ints at a time, not 14M
        for item_size in in_order[start : start + block].tolist():
            if (max_samples and count >= max_samples) or (count and size + item_size > max_bytes):
                cuts.append(i)
                count, size = 0, 0
            count += 1
            size += item_size
            i += 1
    return np.split(rows, cuts) if len(rows) else []


def plan_shards(
    listing: Listing, seed: int, holdout_per_class: int, max_samples: int | None, max_bytes: int | None
) -> list[ShardSpec]:
    train, val = split_holdout(listing, holdout_per_class, seed)
    order_rank = ranks(listing, seed, "order")
    plan = []
    for split, part in (("train", train), ("val", val)):
        for i, rows in enumerate(chunk(shuffle(part, order_rank), listing.size, max_samples, max_bytes)):
            plan.append(ShardSpec(split, i, rows, listing))
    return plan


def task_share(plan: list[T], task_index: int, num_tasks: int) -> list[T]:
    """This task's shards of the plan: every num_tasks-th from task_index (any plan: shard's or index's)."""
    if not 0 <= task_index < num_tasks:
        raise PlanError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return plan[task_index::num_tasks]
