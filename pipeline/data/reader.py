"""Random access to a checked shard set's samples: (shard, sample) -> (image bytes, label).

By the byte ranges of the set's sample table (one pread each; no tar parsing at read time). The label is the
table's label column when it has one (a version 2 split index), else the sample's cls member.

S3 shards are read from the node's shared cache: the reader pins each shard it reads (the pin is the file it
preads from) and lets go of it once this rank's order has no further sample in it (`release_finished`), so the
node's budget holds what its ranks read now and what the read-ahead fetched for next.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from data_prep.shardset.reader import ShardSet
from data_prep.shardset.split_index import SampleTable
from data_prep.shardset.store import open_store

from .cache import Pin, ShardCache


class ShardReader:
    max_open = 64  # pinned shards at most; the least recently read is let go first

    def __init__(self, shard_set: ShardSet, cache: ShardCache):
        if shard_set.table is None:  # open_shard_set always gives one
            raise ValueError(f"{shard_set.url} ({shard_set.split}): a shard set without its sample table")
        self.shard_set = shard_set
        self.table: SampleTable = shard_set.table
        self.store = shard_set.store or open_store(shard_set.url)
        self.cache = cache
        self._pins: OrderedDict[int, Pin] = OrderedDict()

    def __getstate__(self):  # spawned workers pin their own files (forked ones drop the inherited pins)
        state = dict(self.__dict__)
        state["_pins"] = OrderedDict()
        return state

    @property
    def sizes(self) -> list[int]:
        return [s.samples for s in self.shard_set.shards]

    def shard_name(self, shard: int) -> str:
        return self.shard_set.shards[shard].name

    def key(self, shard: int, sample: int) -> str:
        return self.table.key(self.table.row(shard, sample))

    def pin(self, shard: int) -> Pin:
        s = self.shard_set.shards[shard]
        return self.cache.acquire(self.store, s.name, s.bytes)

    def read(self, shard: int, sample: int) -> tuple[bytes, int]:
        pin = self._pins.get(shard)
        if pin is None or pin.closed:
            if len(self._pins) >= self.max_open:
                self._pins.popitem(last=False)[1].close()
            pin = self._pins[shard] = self.pin(shard)
        else:
            self._pins.move_to_end(shard)
        t, row = self.table, self.table.row(shard, sample)
        jpg = os.pread(pin.fd, int(t.jpg_size[row]), int(t.jpg_offset[row]))
        if t.label is not None:  # a version 2 index: the label is a value, no cls member is read
            return jpg, int(t.label[row])
        return jpg, int(os.pread(pin.fd, int(t.cls_size[row]), int(t.cls_offset[row])))

    def release_finished(self, last_batch: np.ndarray, b: int) -> None:
        """Lets go of the shards whose last sample in this rank's order is in batch `b` or before."""
        for shard in [s for s in self._pins if last_batch[s] <= b]:
            self._pins.pop(shard).close()

    def close(self) -> None:
        for pin in self._pins.values():
            pin.close()
        self._pins.clear()


def last_batch_of_shards(order, batch_size: int, num_shards: int) -> np.ndarray:
    """Per shard, the last batch of this order that reads it (-1: none)."""
    last = np.full(num_shards, -1, np.int64)
    if len(order):
        shards, first_from_end = np.unique(order.shard[::-1], return_index=True)
        last[shards] = (len(order) - 1 - first_from_end) // batch_size
    return last
