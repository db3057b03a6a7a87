"""Random access to the samples of a checked shard set: (shard, sample) -> (jpg bytes, label), by the offsets in
the shards' DALI index files (one pread each; no tar parsing at read time)."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.shardset.store import open_store
from data_prep.shardset.index import parse_index

from .cache import ShardCache
from .shard_checks import ShardSet


@dataclass
class _ShardIndex:
    path: Path
    keys: list[str]
    jpg: np.ndarray  # (n, 2) offset, size
    cls: np.ndarray  # (n, 2)


class ShardReader:
    max_open = 64  # open shard files; older ones are closed, so evicted cache files free their space

    def __init__(self, shard_set: ShardSet, cache: ShardCache):
        self.shard_set = shard_set
        self.store = open_store(shard_set.url)
        self.cache = cache
        self._index: dict[int, _ShardIndex] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self):  # DataLoader workers open their own files
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    @property
    def sizes(self) -> list[int]:
        return [s.samples for s in self.shard_set.shards]

    def shard_name(self, shard: int) -> str:
        return self.shard_set.shards[shard].name

    def _local(self, shard: int) -> Path:
        """The shard's local file, fetched again if the cache evicted it since the index was read."""
        return self.cache.paths(self.store, self.shard_set.shards[shard])[0]

    def index(self, shard: int) -> _ShardIndex:
        if shard not in self._index:
            tar, idx = self.cache.paths(self.store, self.shard_set.shards[shard])
            samples = parse_index(idx.read_text())
            keys, jpg, cls = [], [], []
            for components in samples:
                parts = {ext: (offset, size, name) for ext, offset, size, name in components}
                keys.append(parts["jpg"][2].rsplit(".", 1)[0])
                jpg.append(parts["jpg"][:2])
                cls.append(parts["cls"][:2])
            self._index[shard] = _ShardIndex(tar, keys, np.asarray(jpg, np.int64), np.asarray(cls, np.int64))
        return self._index[shard]

    def key(self, shard: int, sample: int) -> str:
        return self.index(shard).keys[sample]

    def read(self, shard: int, sample: int) -> tuple[bytes, int]:
        ix = self.index(shard)
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard] = os.open(self._local(shard), os.O_RDONLY)
        else:
            self._fds.move_to_end(shard)
        (jo, js), (co, cs) = ix.jpg[sample], ix.cls[sample]
        return os.pread(fd, int(js), int(jo)), int(os.pread(fd, int(cs), int(co)))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
