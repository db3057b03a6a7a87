"""Local copies of S3 shards, since the readers read files: a bounded cache for one process.

Each shard (tar + index) is downloaded whole, on first use, to a temporary name and renamed, so a reader never
opens half a file; the least recently used shards (by modification time, refreshed on every hit) are deleted to
stay under max_bytes. A reader that still has an evicted shard open keeps reading it (POSIX keeps an unlinked
file's data while it is open); the next `paths()` call fetches it again. Local shard sets are read in place.
The budget and the lock are per process: several processes sharing one cache_dir are not coordinated yet.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from data_prep.shardset.store import LocalStore

from .shard_checks import Shard


class CacheFullError(RuntimeError):
    pass


class ShardCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self._lock = threading.Lock()

    def paths(self, store, shard: Shard) -> tuple[Path, Path]:
        """(tar, index) as local files, downloading them when needed."""
        if isinstance(store, LocalStore):
            return store.local_path(shard.name), store.local_path(shard.index_name)
        folder = self.root / hashlib.sha256(store.url.encode()).hexdigest()[:16]
        tar, idx = folder / shard.name, folder / shard.index_name
        with self._lock:
            if tar.exists() and tar.stat().st_size == shard.bytes and idx.exists():
                os.utime(tar)  # most recently used
                return tar, idx
            self._make_room(shard.bytes)
            for rel, dest in ((shard.index_name, idx), (shard.name, tar)):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
                store.download(rel, tmp)
                os.replace(tmp, dest)
            if tar.stat().st_size != shard.bytes:
                tar.unlink()
                raise OSError(f"{store.url}/{shard.name}: downloaded {tar.stat().st_size} bytes, "
                              f"the manifest says {shard.bytes}")
            return tar, idx

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.tar")) if self.root.exists() else 0

    def _make_room(self, needed: int) -> None:
        if needed > self.max_bytes:
            raise CacheFullError(f"a {needed}-byte shard does not fit a {self.max_bytes}-byte cache")
        tars = sorted(self.root.rglob("*.tar"), key=lambda p: p.stat().st_mtime) if self.root.exists() else []
        used = sum(p.stat().st_size for p in tars)
        for tar in tars:
            if used + needed <= self.max_bytes:
                return
            used -= tar.stat().st_size
            tar.unlink()
            tar.with_suffix(".idx").unlink(missing_ok=True)
