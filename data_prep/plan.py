"""The deterministic plan: which item goes to which split and shard, and which task writes which shard.

Everything is a pure function of the listing and the options, so every Slurm array task computes the same plan
on its own and writes only its share; no coordination, and a rerun or a different number of tasks or workers
gives the same shards. Order comes from a keyed hash of (seed, item) rather than an RNG stream, so one item's
place never depends on the others.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .sources import Item

SPLITS = ("train", "val")
RECORDS_DIR = "_prep/done"  # one completion record per finished shard


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def index_name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.idx"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/{self.split}-{self.index:06d}.json"


def _rank(seed: int, purpose: str, item: Item) -> bytes:
    return hashlib.blake2b(f"{seed}:{purpose}:{item.path}".encode(), digest_size=8).digest()


def split_holdout(items: list[Item], per_class: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Per class, the `per_class` items ranked first by the hash go to val; a class always keeps at least one
    training image."""
    if per_class <= 0:
        return list(items), []
    by_synset: dict[str, list[Item]] = {}
    for item in items:
        by_synset.setdefault(item.synset, []).append(item)
    train, val = [], []
    for synset in sorted(by_synset):
        group = sorted(by_synset[synset], key=lambda it: _rank(seed, "holdout", it))
        n = min(per_class, len(group) - 1)
        val += group[:n]
        train += group[n:]
    return train, val


def shuffle(items: list[Item], seed: int) -> list[Item]:
    return sorted(items, key=lambda it: _rank(seed, "order", it))


def chunk(items: list[Item], max_samples: int | None, max_bytes: int | None) -> list[list[Item]]:
    """Consecutive runs of at most max_samples items and at most max_bytes source bytes (a single bigger item
    gets a shard of its own). Byte limits count source bytes, so the plan is known before any decode."""
    shards, current, size = [], [], 0
    for item in items:
        full = (max_samples and len(current) >= max_samples) or (max_bytes and current
                                                                 and size + item.size > max_bytes)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        shards.append(current)
    return shards


def make_plan(items: list[Item], seed: int, holdout_per_class: int, max_samples: int | None,
              max_bytes: int | None) -> list[ShardSpec]:
    train, val = split_holdout(items, holdout_per_class, seed)
    plan = []
    for split, part in (("train", train), ("val", val)):
        for i, group in enumerate(chunk(shuffle(part, seed), max_samples, max_bytes)):
            plan.append(ShardSpec(split, i, tuple(group)))
    return plan


def task_share(plan: list[ShardSpec], task_index: int, num_tasks: int) -> list[ShardSpec]:
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return plan[task_index::num_tasks]
