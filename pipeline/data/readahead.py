"""Read-ahead: this rank's next S3 shards copied into the node's cache before the readers need them.

Read-ahead: a background thread that copies this rank's next S3 shards into the node's cache before the
readers need them, so the training thread waits for S3 only at the start of an epoch.

The rank's order is known in advance (pipeline.data.order), so is the sequence of shards it will read. The
thread keeps pinned the shards the loader's batch reads now (a shuffle window spans several) and the next
`ahead` ones after them, letting go of each once the reads have passed its last batch (DALI's feeder reads
batches ahead of the loader, and says how far); it never evicts a copy in use nor goes over the node's budget to do it
(the cache's `overshoot=False`: it waits for room instead).
Downloads go in rounds of `parallel`, nearest first. A fork (DataLoader workers start when the epoch does) waits
for the round in progress, so that a child never inherits a lock or a boto3 connection held mid-download, and no
round starts until it is done: the workers start after the first shards arrive, which they need first anyway,
not after every shard of the first step.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .cache import Pin
from .order import EpochOrder
from .reader import ShardReader, last_batch_of_shards

log = logging.getLogger(__name__)
_running: weakref.WeakSet[ReadAhead] = weakref.WeakSet()


class ReadAhead:
    def __init__(
        self,
        reader: ShardReader,
        order: EpochOrder,
        batch_size: int,
        ahead: int,
        start_batch: int = 0,
        parallel: int = 4,
    ):
        self.reader, self.ahead, self.parallel = reader, ahead, parallel
        shards, first = np.unique(order.shard, return_index=True)
        by_first_use = np.argsort(first, kind="stable")
        self.sequence = shards[by_first_use].tolist()  # in the order this rank first reads them
        self.first = dict(
            zip(shards.tolist(), (first // batch_size).tolist(), strict=True)
        )  # batch of each one's first use
        self.last = last_batch_of_shards(order, batch_size, len(reader.sizes)).tolist()
        self.position = start_batch
        self.pins: dict[int, Pin] = {}
        self.error: BaseException | None = None
        self._wake = threading.Condition()  # guards position, pins, _stop, _busy and _forking
        self._busy = False  # a round of downloads is in progress; a fork waits for it to end
        self._forking = False  # a fork is waiting or under way; no round starts
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
        _running.add(self)
        self._thread.start()

    def advance(self, batch: int) -> None:
        """Moves the read-ahead to `batch`: the shards behind it go, the next ones are fetched.

        Reads have reached `batch`: the shards read only before it go now, in the caller's thread (so the
        reader's next shard finds their room), and the thread fetches the next ones. Called by the loader as it
        hands out batches and, where the reads run ahead of that in this process (DALI's feeder), by the reads;
        the furthest position wins."""
        with self._wake:
            if batch <= self.position:
                return
            self.position = batch
            self._release_passed()
            self._wake.notify()

    def depth(self) -> int:
        """How many shards it holds on the node for the loader now.

        Shards it holds on the node for the loader now: those the current batches read and the next ones
        (0: the loader is about to wait for S3)."""
        return len(self.pins)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()
        with self._wake:
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
                waiting = self._work(position)
                with self._wake:
                    if not self._stop and self.position == position:
                        self._wake.wait(0.2 if waiting else None)
        except BaseException as e:  # noqa: BLE001  (the reader fetches what it needs itself; say why read-ahead stopped)
            self.error = e
            log.warning("shard read-ahead stopped (the loader reads on without it): %s", e)

    def _work(self, position: int) -> bool:
        """Starts the next downloads; True when the cache budget had no room for one.

        Pins what comes next, `parallel` downloads at a time (nearest first); True when the budget had no
        room for one of them (try again shortly)."""
        with self._wake:
            self._release_passed()
            held = set(self.pins)
        wanted, upcoming = [], 0
        for shard in self.sequence:  # the shards being read now (a shuffle window spans several), then `ahead` more
            if self.last[shard] < position:
                continue
            if self.first[shard] > position:
                upcoming += 1
                if upcoming > self.ahead:
                    break
            if shard not in held:
                wanted.append(shard)
        no_room = False
        for start in range(0, len(wanted), self.parallel):
            if not self._begin_round():
                break
            try:
                group = wanted[start : start + self.parallel]
                with ThreadPoolExecutor(len(group)) as pool:  # its threads end with the round
                    pins = list(pool.map(self._acquire, group))
            finally:
                self._end_round()
            with self._wake:
                for shard, pin in zip(group, pins, strict=True):
                    if pin is not None:
                        self.pins[shard] = pin
                self._release_passed()  # the reads may have passed some while they downloaded
            if any(pin is None for pin in pins):
                no_room = True
                break
            with self._wake:
                if self.position != position:  # the loader moved on: look again at what is wanted
                    break
        return no_room

    def _release_passed(self) -> None:
        """Under the lock: lets go of the shards no batch from `position` on reads."""
        for shard in [s for s in self.pins if self.last[s] < self.position]:
            self.pins.pop(shard).close()

    def _begin_round(self) -> bool:
        with self._wake:
            while self._forking and not self._stop:
                self._wake.wait()
            self._busy = not self._stop
            return self._busy

    def _end_round(self) -> None:
        with self._wake:
            self._busy = False
            self._wake.notify_all()

    def _acquire(self, shard: int) -> Pin | None:
        with self._wake:
            if self._stop:
                return None
        s = self.reader.shard_set.shards[shard]
        return self.reader.cache.acquire(self.reader.store, s.name, s.bytes, overshoot=False)


def _pause_all() -> None:
    for ra in list(_running):
        with ra._wake:
            ra._forking = True
            while ra._busy:
                ra._wake.wait()


def _resume_all() -> None:
    for ra in list(_running):
        with ra._wake:
            ra._forking = False
            ra._wake.notify_all()


def _in_child() -> None:
    # the thread does not exist in the child; its pins were closed by the cache's own fork hook. A fresh
    # condition: the thread may have held the old one at the fork, and nothing in the child would release it.
    for ra in list(_running):
        ra._wake = threading.Condition()
        ra._stop, ra._forking, ra._busy = True, False, False
    _running.clear()


os.register_at_fork(before=_pause_all, after_in_parent=_resume_all, after_in_child=_in_child)
