"""The stop signals and the exit status of a stopped run, shared by every process of a run.

The stop signals and the exit status of a stopped run, shared by the training loop (pipeline/engine/stop.py),
the data loader's worker processes and the launch scripts (launch/, which read EXIT_STOPPED as "resume me").

SIGTERM: scancel, a Slurm preemption or time limit, a spot reclaim, Kubernetes, the `deepspeed` launcher passing
one on. SIGUSR1: Slurm's `--signal=USR1@SECONDS`, sent before the time limit.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped at a checkpoint; the same command resumes from it


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """Makes this process ignore the stop signals, which the rank it serves handles.

    For processes a rank starts to serve it (DataLoader workers: their worker_init_fn). A launcher signals the
    rank's whole process tree; a worker that died of it would end the rank with torch's SIGCHLD error in the
    middle of the rank's save. The rank shuts its workers down itself once saved."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
