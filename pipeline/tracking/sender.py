"""Every MLflow call of a run, made in order on one background thread that never blocks training: a call that
fails because the server is away is retried (backoff up to 30 s) until it succeeds, so an outage delays the run's
records but loses none; a call the server refuses (4xx) is dropped with a warning."""

from __future__ import annotations

import logging
import queue
import threading
import time

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from swin_common.redact import redact_text

log = logging.getLogger(__name__)
BATCH = 500  # metrics per log_batch call (MLflow's limit is 1000)


class Sender:
    """Runs MLflow calls in order on one thread; a failing call is retried (backoff up to 30 s) until it
    succeeds, so an outage delays the run's records but loses none and never blocks training."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.ops: queue.Queue = queue.Queue()
        self.metrics: list = []  # pending Metric objects, sent in batches
        self.lock = threading.Lock()
        self.failing_since: float | None = None
        self.sent_metrics = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self.thread.start()

    def call(self, fn, *args, **kwargs) -> None:
        self.ops.put((fn, args, kwargs))

    def metric(self, key: str, value: float, step: int) -> None:
        with self.lock:
            self.metrics.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def pending(self) -> int:
        with self.lock:
            return self.ops.qsize() + len(self.metrics)

    def _run(self) -> None:
        delay = 1.0
        current = None
        while not (self.stop.is_set() and current is None and self.ops.empty() and not self.metrics):
            batch = []
            try:
                if current is None and not self.ops.empty():
                    current = self.ops.get_nowait()
                if current is not None:
                    fn, args, kwargs = current
                    fn(*args, **kwargs)
                    current = None
                with self.lock:
                    batch = self.metrics[:BATCH]
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
                    with self.lock:
                        del self.metrics[: len(batch)]
                    self.sent_metrics += len(batch)
                if self.failing_since is not None:
                    log.warning(
                        "MLflow is reachable again after %.0f s; sending the %d records kept meanwhile",
                        time.time() - self.failing_since,
                        self.pending(),
                    )
                    self.failing_since = None
                delay = 1.0
                if current is None and self.ops.empty() and not self.metrics:
                    self.stop.wait(0.5)
            except Exception as e:  # noqa: BLE001  (keep the records, try again later)
                if rejected(e):  # the server answered "no" to this call: retrying it cannot help
                    if current is not None:
                        log.warning("MLflow refused a call, skipped: %s", short_error(e))
                        current = None
                    else:  # drop the batch it answered, not the records queued after it
                        log.warning("MLflow refused a batch of %d metrics, skipped: %s", len(batch), short_error(e))
                        with self.lock:
                            del self.metrics[: len(batch)]
                    continue
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning(
                        "MLflow unreachable (%s); training goes on, %d records kept to send later "
                        "(they are in metrics.jsonl too)",
                        short_error(e),
                        self.pending(),
                    )
                time.sleep(delay)  # not stop.wait: once closing, stop is set and would make this spin
                delay = min(delay * 2, 30.0)

    def close(self, timeout: float) -> bool:
        """Waits up to `timeout` s for everything to be sent; True when nothing is left."""
        self.stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()


def rejected(e: Exception) -> bool:
    """An MLflow error the server (or store) gave as an answer (4xx), as opposed to not being reachable."""
    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


def short_error(e: BaseException) -> str:
    """The first line of an error, redacted, at most 200 characters."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return redact_text(text)[:200]
