"""Local copies of S3 shards, shared by every process of a node (its ranks and their DataLoader workers).

The readers read files (one pread per sample), so an S3 shard is copied whole into `root`. One byte budget per
node, kept across processes with file locks, since ranks and workers are separate processes that start and die
on their own:
- `root/.lock` (flock, exclusive) is held briefly while a process looks up, claims or evicts files;
- a process using a copy holds a shared flock on it (a `Pin`: the open file the reader preads from); eviction
  takes the least recently used copies whose exclusive flock it can get, so a copy in use is never deleted;
- a download goes to `.NAME.part`, claimed with an exclusive flock and sized to the whole shard first (so the
  budget counts it), then renamed; others wanting that shard wait on its lock instead of downloading it too.
  The kernel drops the locks of a killed process: its `.part` is then stale, and the next process that wants the
  shard (or needs the room) takes it over or deletes it. A half-written copy never has the final name.
When the copies in use (and being downloaded) exceed the budget, the cache overshoots with one warning per
process rather than fail. Local shard sets are read in place.

`stats()`: S3 shards this cache object found on the node (hits, another process's download included) and
downloaded itself (misses), counted in shared memory made with it, so the DataLoader workers forked from its
process count into the same numbers (the training log shows them per window).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, overload

from data_prep.shardset.store import LocalStore
from swin_common.errors import UserError

log = logging.getLogger(__name__)


class CacheFullError(UserError, RuntimeError):
    """A shard larger than the node's whole cache budget (data.cache_bytes)."""


class Pin:
    """An open copy that eviction leaves alone until closed (a shared flock on it); read it with pread(fd)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        _live_pins.add(self)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops this process's lock with it
            self.fd = -1


_live_pins: weakref.WeakSet[Pin] = weakref.WeakSet()


def _forget_inherited_pins() -> None:
    # A forked child (a DataLoader worker) shares its parent's open files, and with them the locks: closing its
    # copies lets the parent's later release really unpin a shard. The child pins what it reads itself.
    for pin in list(_live_pins):
        pin.close()


os.register_at_fork(after_in_child=_forget_inherited_pins)


class ShardCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self._warned = False
        self._counts = multiprocessing.RawArray("q", 2)  # hits, misses; shared with forked workers

    def stats(self) -> dict[str, int]:
        return {"cache_hits": int(self._counts[0]), "cache_misses": int(self._counts[1])}

    def _count(self, which: int) -> None:
        self._counts[which] += 1  # one writer per slot at a time is not guaranteed: a rare lost count is fine

    # -- use ------------------------------------------------------------------------------------------------
    @overload
    def acquire(self, store, rel: str, size: int, overshoot: Literal[True] = True) -> Pin: ...
    @overload
    def acquire(self, store, rel: str, size: int, overshoot: bool) -> Pin | None: ...
    def acquire(self, store, rel: str, size: int, overshoot: bool = True) -> Pin | None:
        """A pinned local copy of `rel` (`size` bytes), downloaded when no process of the node has it.

        Without
        `overshoot` (read-ahead), None when it would not fit the budget beside the copies in use."""
        if isinstance(store, LocalStore):
            return Pin(os.open(store.local_path(rel), os.O_RDONLY), store.local_path(rel))
        if size > self.max_bytes:
            raise CacheFullError(
                f"{store.url}/{rel} ({size} bytes) does not fit a {self.max_bytes}-byte cache (data.cache_bytes)"
            )
        final = self.root / hashlib.sha256(store.url.encode()).hexdigest()[:16] / rel
        part = final.with_name(f".{final.name}.part")
        while True:
            with self._node_lock():
                pin = self._open_copy(final, size)
                if pin is not None:
                    self._count(0)
                    return pin
                if not self._make_room(size, exclude=part, overshoot=overshoot):
                    return None
                final.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
                if _try_lock(fd, fcntl.LOCK_EX):  # ours to download (or a killed process's leftover to redo)
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)  # the budget counts it from now
                    claimed = True
                else:
                    claimed = False
            if claimed:
                pin = self._download(store, rel, size, fd, part, final)
                self._count(1)
                return pin
            pin = self._wait_for_download(fd, final, size)
            if pin is not None:
                self._count(0)
                return pin
            time.sleep(0.01)  # its download failed or its process died: try again (perhaps to download it)

    @contextmanager
    def pinned(self, store, rel: str, size: int):
        """The local path of a copy, pinned for the `with` block."""
        pin = self.acquire(store, rel, size)
        try:
            yield pin.path
        finally:
            pin.close()

    def cached_bytes(self) -> int:
        """Bytes of the copies and downloads in the cache now."""
        return sum(size for _path, size, _mtime in self._files())

    # -- inside ---------------------------------------------------------------------------------------------
    @contextmanager
    def _node_lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _open_copy(self, final: Path, size: int) -> Pin | None:
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != size:  # a copy of an older shard under this name: replace it
            os.close(fd)
            final.unlink(missing_ok=True)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while its downloader turns its lock into a shared one
        os.utime(final)  # most recently used
        return Pin(fd, final)

    def _download(self, store, rel: str, size: int, fd: int, part: Path, final: Path) -> Pin:
        try:
            with os.fdopen(os.dup(fd), "r+b") as f:
                store.download_to(rel, f, size)
                f.flush()
                os.fsync(f.fileno())  # on disk before it has its name
            if os.fstat(fd).st_size != size:
                raise OSError(f"{store.url}/{rel}: downloaded {os.fstat(fd).st_size} bytes, the manifest says {size}")
        except BaseException:
            with self._node_lock():
                part.unlink(missing_ok=True)
            os.close(fd)
            raise
        with self._node_lock():
            os.rename(part, final)
            fcntl.flock(fd, fcntl.LOCK_SH)  # now a reader of it like the others
        return Pin(fd, final)

    def _wait_for_download(self, fd: int, final: Path, size: int) -> Pin | None:
        """Another process is downloading it: wait for its lock, then use its copy if it completed."""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            try:
                done = os.stat(final).st_ino == st.st_ino and st.st_size == size
            except FileNotFoundError:
                done = False
            if done:
                os.utime(final)
                return Pin(fd, final)
        except OSError:
            pass
        os.close(fd)
        return None

    def _files(self) -> list[tuple[Path, int, float]]:
        out: list[tuple[Path, int, float]] = []
        if not self.root.exists():
            return out
        for folder, _dirs, names in os.walk(self.root):
            for name in names:
                if name == ".lock":
                    continue
                path = Path(folder) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                out.append((path, st.st_size, st.st_mtime))
        return out

    def _make_room(self, needed: int, exclude: Path, overshoot: bool) -> bool:
        """Whether `needed` more bytes fit in the cache, once what can go has gone.

        Under the node lock: evicts unused copies, least recently used first, and stale downloads, until
        `needed` more bytes fit. False (read-ahead) or one warning (a reader that needs it now) when they don't."""
        files = [f for f in self._files() if f[0] != exclude]  # a stale .part being taken over is re-sized
        used = sum(size for _p, size, _m in files)
        if used + needed <= self.max_bytes:
            return True
        for path, size, _mtime in sorted(files, key=lambda f: f[2]):
            if _unlink_if_unused(path):
                used -= size
                if used + needed <= self.max_bytes:
                    return True
        if not overshoot:
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "shard cache %s: the shards in use need %d bytes beside this one (%d), over its budget "
                "of %d (data.cache_bytes); going over it rather than failing (warned once)",
                self.root,
                used,
                needed,
                self.max_bytes,
            )
        return True


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _unlink_if_unused(path: Path) -> bool:
    """Deletes a copy (or a dead process's download) that no process holds; never one in use."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        if not _try_lock(fd, fcntl.LOCK_EX):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
