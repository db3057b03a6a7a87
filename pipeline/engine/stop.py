"""Stop signals: a signal only sets a flag; the ranks agree at the next step boundary, save, and exit.

SIGTERM (scancel, a Slurm preemption or time limit, a spot reclaim, Kubernetes, the `deepspeed` launcher passing
one on) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS` before the time limit) end a run at the optimizer step it
reached: the handler records the signal and returns, the step in flight finishes, and at its boundary every rank
takes part in one small all-reduce (a CPU int, so gloo, never a wait on the GPU) that says whether any rank saw a
signal. A signal that reached one rank only therefore stops all of them at the same step, and none waits in a
collective the others never join (Lightning #20806). The run then saves a complete checkpoint at that step and
exits with EXIT_STOPPED, which launchers and the Slurm script read as "resume me".

The same check runs between evaluation batches and before the end-of-run export, so a signal there ends the run
as promptly (the checkpoint then says that the resumed run owes that evaluation). DataLoader workers ignore both signals
(swin_common.signals.ignore_stop_signals).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from swin_common.signals import EXIT_STOPPED, STOP_SIGNALS  # noqa: F401  (EXIT_STOPPED: for the train command)

log = logging.getLogger(__name__)
# what signal.signal() takes and returns: a handler, SIG_DFL/SIG_IGN, or None (a handler not set from Python)
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class RunStopped(Exception):
    """The ranks agreed to stop at `step` (a signal); raised out of the loop once the checkpoint is saved."""

    def __init__(self, signal_name: str, step: int, during: str):
        super().__init__(f"{signal_name} at step {step} ({during})")
        self.signal_name, self.step, self.during = signal_name, step, during

    def __reduce__(self):  # rank 0 broadcasts it (broadcast_object pickles): rebuilt from its three fields
        return RunStopped, (self.signal_name, self.step, self.during)


def stop_if_agreed(step: int, during: str) -> None:
    """Raises RunStopped on every rank when any rank received a stop signal (a collective).

    At a boundary, on every rank: raises RunStopped (at `step`, `during` what) when any rank received a stop
    signal (a collective)."""
    name = stop_flag().agreed()
    if name:
        raise RunStopped(name, step, during)


class StopFlag:
    """Where a stop signal lands. `install()` in the main thread; `agreed()` at step boundaries, on every rank."""

    def __init__(self) -> None:
        self.signum: int = 0
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, SignalHandler] = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Back to the handlers from before (an expected error on its way out must not outlive a SIGTERM)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def run_complete(self) -> None:
        """The run is complete: a stop signal from now on has nothing to save.

        It is ignored rather than left to
        the handler, which Python resets to the default (die) while the interpreter shuts down; an ignored
        signal stays ignored (CPython's _PySignal_Fini), so a Slurm time-limit SIGUSR1 that lands during the
        teardown of a finished run no longer turns its exit 0 into "killed by signal". A hung teardown still
        ends: the launchers follow SIGTERM with SIGKILL."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()
        if self.signum:
            log.info("%s came after the last step boundary: the run is complete, nothing to stop", self.signal_name)

    def _handle(self, signum, frame) -> None:  # runs in the main thread between bytecodes: only record
        if not self.signum:
            self.signum, self.received_at = signum, time.monotonic()
            os.write(
                2,
                f"[rank {os.environ.get('RANK', '0')}] {signal.Signals(signum).name} received: stopping at "
                f"the next step boundary, after saving a checkpoint\n".encode(),
            )

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self) -> str | None:
        """The signal that stops the run when any rank received one (SIGTERM before SIGUSR1), else None.

        A
        collective: every rank calls it at the same point."""
        import torch  # here, not at the top: the train command installs the flag before its slow imports

        from pipeline.engine.distributed import all_reduce_max

        code = int(all_reduce_max(torch.tensor([self.signum], dtype=torch.int32))[0])
        return signal.Signals(code).name if code else None

    def seconds_since(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at


_flag: StopFlag | None = None


def stop_flag() -> StopFlag:
    """This process's flag (installed by the train command; never installed, it never trips)."""
    global _flag
    if _flag is None:
        _flag = StopFlag()
    return _flag
