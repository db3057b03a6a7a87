"""Where the time went, per log window and for the whole run.

Where the time went: each rank's own time, its wait for data, checkpoints and evaluations, per log window and
for the whole run.

A rank's own time is, per micro batch, the host's time from asking the loader for the batch to the end of the
backward's compute (a hook on the parameter whose gradient the backward makes last, the patch embedding's),
less the finite-loss check's all-reduce where there is one: the part of a step that is this rank's alone, before
the collectives that make every rank wait for the slowest. So a stalled rank (a slow disk, a stopped or swapped
process, a throttled host) shows as the slowest with its stall, not as the wait every rank then shares. ZeRO-3
gathers parameters during the forward, so there its own time also holds those waits. A stall in the
optimizer's step comes after the collectives and so shows as every rank's wait, not as one rank's. The
clock is the host's: no GPU synchronisation in the hot loop; on GPUs, whose kernels run ahead of the host, a
slow GPU shows only where the host waits for it (DataLoader pinning, the loss check's host read).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Times:
    """Seconds of one rank, summed (a log window's, or the whole run's)."""

    own: float = 0.0  # data wait + forward + backward compute, up to the step's collectives
    data: float = 0.0  # waiting for the loader's next batch (part of `own`)
    checkpoint: float = 0.0
    eval: float = 0.0
    steps: int = 0

    def add(self, other: Times) -> None:
        self.own += other.own
        self.data += other.data
        self.checkpoint += other.checkpoint
        self.eval += other.eval
        self.steps += other.steps


@dataclass
class RunClock:
    """The log window's times and the run's, and the backward-end mark."""

    window: Times = field(default_factory=Times)
    total: Times = field(default_factory=Times)
    started: float = field(default_factory=time.perf_counter)  # the training loop's start (the run summary)
    backward_end: float | None = None

    def watch_backward(self, model) -> None:
        """Has every backward of `model` record when its compute ended.

        Marks the end of every backward's compute: the first parameter (the patch embedding's) gets its
        gradient last."""
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_post_accumulate_grad_hook(self._mark)

    def _mark(self, _param) -> None:
        self.backward_end = time.perf_counter()

    def micro(self, started: float, batch_ready: float, excluded: float = 0.0) -> None:
        """Adds one micro batch's wait for data and its own time to the log window.

        One micro batch: asked for at `started`, received at `batch_ready`; `excluded`: seconds of it spent in
        a collective before the backward (the finite-loss check)."""
        end = (
            self.backward_end
            if self.backward_end is not None and self.backward_end > batch_ready
            else time.perf_counter()
        )
        self.backward_end = None
        self.window.own += end - started - excluded
        self.window.data += batch_ready - started

    def close_window(self) -> Times:
        """The window's times (added to the run's); a new window starts."""
        window, self.window = self.window, Times()
        self.total.add(window)
        return window


def window_fields(per_rank: list[tuple[float, float]], steps: int, elapsed: float) -> dict:
    """A log record's timing fields, from every rank's own and data-wait seconds over the window.

    A log record's timing fields from every rank's (own, data) seconds over a window of `steps` steps that
    took `elapsed` s on rank 0: own time per step (median and max over the ranks, the slowest rank's id) and
    the data wait (the most any rank waited, in s per step and in % of the step time)."""
    own = [o for o, _ in per_rank]
    data = max(d for _, d in per_rank)
    slowest = max(range(len(own)), key=own.__getitem__)
    per = max(steps, 1)
    return {
        "step_s": elapsed / per,
        "own_s_median": statistics.median(own) / per,
        "own_s_max": own[slowest] / per,
        "slowest_rank": slowest,
        "data_wait_s": data / per,
        "data_wait_pct": 100.0 * data / elapsed if elapsed > 0 else None,
    }


def s3_fields(now: list[dict], before: list[dict] | None) -> dict:
    """A log record's S3 fields: the window's node-cache hits and misses, and the shortest read-ahead.

    For a set on S3, from every rank's loader.s3_stats() now and at the last record: the window's node-cache
    hits and misses (summed over the ranks) and the read-ahead depth of the rank with the fewest shards ahead."""
    before = before or [{} for _ in now]
    return {
        "cache_hits": sum(n["cache_hits"] - b.get("cache_hits", 0) for n, b in zip(now, before, strict=True)),
        "cache_misses": sum(n["cache_misses"] - b.get("cache_misses", 0) for n, b in zip(now, before, strict=True)),
        "read_ahead_depth": min(n["read_ahead_depth"] for n in now),
    }


def run_summary(clock: RunClock) -> dict:
    """Rank 0's whole loop split into compute (and its collectives), data wait, checkpoints and evaluations."""
    total = time.perf_counter() - clock.started
    t = clock.total
    t.add(clock.window)  # what the last log line did not close
    clock.window = Times()
    compute = max(total - t.data - t.checkpoint - t.eval, 0.0)
    return {
        "total_s": round(total, 1),
        "compute_s": round(compute, 1),
        "data_wait_s": round(t.data, 1),
        "checkpoint_s": round(t.checkpoint, 1),
        "eval_s": round(t.eval, 1),
    }


def summary_line(s: dict) -> str:
    total = max(s["total_s"], 1e-9)
    parts = [
        f"{name} {s[key]:.0f} s ({100 * s[key] / total:.0f}%)"
        for name, key in (
            ("compute", "compute_s"),
            ("data wait", "data_wait_s"),
            ("checkpoints", "checkpoint_s"),
            ("evaluation", "eval_s"),
        )
    ]
    return f"time: {s['total_s']:.0f} s training = " + ", ".join(parts)
