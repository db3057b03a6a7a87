"""Read-ahead: a background thread that copies this rank's next S3 shards into the node's cache before the
readers need them, so the training thread waits for S3 only at the start of an epoch.

The rank's order is known in advance (pipeline.data.order), so is the sequence of shards it will read. The
thread keeps pinned the shards the loader's batch reads now (a shuffle window spans several) and the next
`ahead` ones after them, letting go of each once the loader has passed its last batch; it never evicts a copy
in use nor goes over the node's budget to do it (the cache's `overshoot=False`: it waits for room instead). A
fork (DataLoader workers) waits for the step in progress, so a child never inherits a lock held mid-download.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .reader import last_batch_of_shards

log = logging.getLogger("pipeline.data")
_running: "weakref.WeakSet[ReadAhead]" = weakref.WeakSet()


class ReadAhead:
    def __init__(self, reader, order, batch_size: int, ahead: int, start_batch: int = 0, parallel: int = 4):
        self.reader, self.ahead, self.parallel = reader, ahead, parallel
        shards, first = np.unique(order.shard, return_index=True)
        by_first_use = np.argsort(first, kind="stable")
        self.sequence = shards[by_first_use].tolist()  # in the order this rank first reads them
        self.first = dict(zip(shards.tolist(), (first // batch_size).tolist()))  # batch of each one's first use
        self.last = last_batch_of_shards(order, batch_size, len(reader.sizes)).tolist()
        self.position = start_batch
        self.pins: dict[int, object] = {}
        self.error: BaseException | None = None
        self._wake = threading.Condition()
        self._step = threading.Lock()  # held while the thread works; a fork waits for it
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
        _running.add(self)
        self._thread.start()

    def advance(self, batch: int) -> None:
        """The loader is at `batch`: shards read only before it can go, the next ones come."""
        with self._wake:
            self.position = batch
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()
        for pin in self.pins.values():
            pin.close()
        self.pins.clear()
        _running.discard(self)

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    if self._stop:
                        return
                    position = self.position
                with self._step:
                    waiting = self._work(position)
                with self._wake:
                    if not self._stop and self.position == position:
                        self._wake.wait(0.2 if waiting else None)
        except BaseException as e:  # the reader fetches what it needs itself; say why read-ahead stopped
            self.error = e
            log.warning("shard read-ahead stopped (the loader reads on without it): %s", e)

    def _work(self, position: int) -> bool:
        """Pins what comes next, `parallel` downloads at a time (nearest first); True when the budget had no
        room for one of them (try again shortly)."""
        for shard in [s for s in self.pins if self.last[s] < position]:
            self.pins.pop(shard).close()
        wanted, upcoming = [], 0
        for shard in self.sequence:  # the shards being read now (a shuffle window spans several), then `ahead` more
            if self.last[shard] < position:
                continue
            if self.first[shard] > position:
                upcoming += 1
                if upcoming > self.ahead:
                    break
            if shard not in self.pins:
                wanted.append(shard)
        if not wanted:
            return False
        with ThreadPoolExecutor(min(self.parallel, len(wanted))) as pool:  # ends before a fork may go on
            pins = list(pool.map(self._acquire, wanted))
        for shard, pin in zip(wanted, pins, strict=True):
            if pin is not None:
                self.pins[shard] = pin
        return any(pin is None for pin in pins)

    def _acquire(self, shard: int):
        with self._wake:
            if self._stop:
                return None
        s = self.reader.shard_set.shards[shard]
        return self.reader.cache.acquire(self.reader.store, s.name, s.bytes, overshoot=False)


def _pause_all() -> None:
    for ra in list(_running):
        ra._step.acquire()


def _resume_all() -> None:
    for ra in list(_running):
        if ra._step.locked():
            ra._step.release()


def _in_child() -> None:
    # the thread does not exist in the child; its pins were closed by the cache's own fork hook
    for ra in list(_running):
        if ra._step.locked():
            ra._step.release()
        ra._stop = True
    _running.clear()


os.register_at_fork(before=_pause_all, after_in_parent=_resume_all, after_in_child=_in_child)
