"""The MLflow run of a training job, that never stops the training: opened (or reopened) by rank 0, fed params,
metrics and artifacts, and ended FINISHED, FAILED or KILLED.

- Rank 0 creates the MLflow run (or, when the job resumes a checkpoint, reopens the run recorded in
  `<run>/mlflow_run.json`) and broadcasts its id; every node's local rank 0 logs MLflow system metrics into it
  with its host name as node id (system_metrics.py).
- Params (params.py): the resolved config (flattened), world size, DeepSpeed config, the shard manifest's hash and
  counts, package versions; tags: git commit and dirty flag. Artifacts: config.yaml, metrics.jsonl and training
  curves (PNG) at the end. Metrics: what the loop logs, at the optimizer step.
- Every call to the server goes through one background thread with short HTTP timeouts (sender.py). If the
  server goes away, a warning is logged, metrics wait in memory (they are in metrics.jsonl too) and are sent when
  it is back; at the end the run waits a bounded time for them.
- Secrets never reach MLflow or the run's folder: every param and tag goes through params.redact, the config.yaml
  artifact through redact_text, and `mlflow_run.json` holds the store's redacted URI; a resumed job compares
  redacted forms.
- The store is the one the job resolved at launch (store.py: a Store, passed in).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from pipeline.config import config_to_dict
from pipeline.engine.distributed import all_gather_object, broadcast_object
from pipeline.tracking.params import config_params, git_state, redact
from pipeline.tracking.sender import Sender, short_error
from pipeline.tracking.store import Store, check_nodes
from pipeline.tracking.system_metrics import node_name, start_system_metrics
from swin_common.redact import redact_text, remember_secrets, secret_values

log = logging.getLogger(__name__)
STOP_FLUSH_S = 10.0  # how long a stopped run waits for MLflow before exiting (see Tracker.stopped)
# Fail fast per request (the sender thread retries on its own schedule); users can set their own values.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow 3's UI: an experiment without this tag opens as a GenAI one (traces, no runs)
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
RUN_RECORD = "mlflow_run.json"


# -- the tracker -------------------------------------------------------------------------------------------
class Tracker:
    """One per rank; only rank 0 talks to MLflow (plus each node's local rank 0, for system metrics)."""

    def __init__(self, cfg, world, store: Store, resumed: bool, extra_params: dict | None = None):
        """Every rank: checks the store suits the job (a local store is for one node), then rank 0 opens (or, when
        `resumed`, reopens) the run in `store` and every rank gets its id; each node's local rank 0 starts system
        metrics. MLflow unreachable for tracking.start_timeout_s: the run is not tracked (run_id None)."""
        self.cfg, self.world, self.store = cfg, world, store
        self.enabled = cfg.tracking.enabled
        if self.enabled:
            remember_secrets(store.uri)  # its password is cut from all text, in whatever form it shows up
        nodes = sorted(set(all_gather_object(node_name())))  # every rank takes part, so every rank decides alike
        if self.enabled:
            check_nodes(store, nodes)
        self.sender: Sender | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # rank 0's, once its run is open
        self.monitor = None
        self.secrets = secret_values()
        run_id = None
        if self.enabled and world.is_main:
            run_id = self._open_run(resumed, extra_params or {})
        run_id = broadcast_object(run_id)
        self.run_id = run_id
        if run_id and cfg.tracking.system_metrics and world.local_rank == 0:
            self.monitor = start_system_metrics(run_id, store, cfg.tracking.system_metrics_s)

    def _open_run(self, resumed: bool, extra_params: dict) -> str | None:
        for key, value in HTTP_DEFAULTS.items():  # read by MLflow at each request
            os.environ.setdefault(key, value)
        record = self.cfg.run_dir / RUN_RECORD
        deadline = time.time() + self.cfg.tracking.start_timeout_s
        while True:
            try:
                client = MlflowClient(self.store.uri)
                previous = json.loads(record.read_text()) if resumed and record.is_file() else None
                # the record holds the redacted URI (older records the full one): compare redacted forms
                if previous and redact_text(previous.get("tracking_uri", "")) == self.store.redacted:
                    run_id = previous["run_id"]
                    client.update_run(run_id, status="RUNNING")
                    self.experiment_id = client.get_run(run_id).info.experiment_id
                    log.info("MLflow: continuing run %s at %s", run_id, self.store.redacted)
                    new = False
                else:
                    run_id = self._create_run(client)
                    new = True
                break
            except Exception as e:  # noqa: BLE001
                if time.time() > deadline:
                    log.warning(
                        "MLflow at %s unreachable (%s): this run is not tracked (metrics.jsonl has everything)",
                        self.store.redacted,
                        short_error(e),
                    )
                    return None
                time.sleep(2)
        staged = record.with_name(record.name + ".tmp")  # renamed, so a reader never sees it half written
        staged.write_text(
            json.dumps({"run_id": run_id, "tracking_uri": self.store.redacted, "experiment_id": self.experiment_id})
            + "\n"
        )
        os.replace(staged, record)
        self.run_id, self.sender = run_id, Sender(client, run_id)
        if new:
            self.log_params(config_params(config_to_dict(self.cfg), self.world.size, extra_params))
            self.sender.call(
                client.log_text,
                run_id,
                redact_text((self.cfg.run_dir / "config.yaml").read_text(), self.secrets),
                "config.yaml",
            )
        return run_id

    def _create_run(self, client) -> str:
        """A new run in tracking.experiment (created with the store's artifact location when missing)."""
        name = self.cfg.tracking.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = client.create_experiment(name, artifact_location=self.store.artifacts, tags=EXPERIMENT_TAGS)
        else:
            experiment_id = experiment.experiment_id
            if not (experiment.tags or {}).get(EXPERIMENT_KIND):  # made by another tool, or before the tag
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
        tags = {
            "mlflow.runName": self.cfg.name,
            **git_state(Path(__file__).resolve().parents[2]),
            "run_dir": str(self.cfg.run_dir.resolve()),
        }
        run = client.create_run(experiment_id, run_name=self.cfg.name, tags=redact(tags))
        self.experiment_id = str(experiment_id)
        log.info("MLflow: run %s (experiment %s) at %s", run.info.run_id, name, self.store.redacted)
        return run.info.run_id

    # -- recording -----------------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        if self.sender is None:
            return
        safe = redact(params)
        items = [Param(k, v[:6000]) for k, v in safe.items()]
        for i in range(0, len(items), 100):
            self.sender.call(self.sender.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, step: int, values: dict) -> None:
        if self.sender is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                self.sender.metric(key, value, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.sender is not None and path.exists():
            fn = self.sender.client.log_artifacts if path.is_dir() else self.sender.client.log_artifact
            self.sender.call(fn, self.run_id, str(path), artifact_path)

    def flush(self, timeout: float) -> bool:
        """Waits up to `timeout` s for the calls queued so far to be made; True when they were."""
        if self.sender is None:
            return True
        reached = threading.Event()
        self.sender.call(reached.set)
        if not reached.wait(timeout):
            log.warning(
                "MLflow: %d records still queued after %.0f s; they are sent later, and are in %s",
                self.sender.pending(),
                timeout,
                self.cfg.run_dir / "metrics.jsonl",
            )
            return False
        return True

    def call(self, fn, *args, **kwargs) -> None:
        """Any other MLflow call, in order with the rest."""
        if self.sender is not None:
            self.sender.call(fn, *args, **kwargs)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.sender is not None:
            for key, value in redact(tags).items():
                self.sender.call(self.sender.client.set_tag, self.run_id, key, value)

    def stopped(self, stop) -> None:
        """Stopped by a signal at a checkpoint: tagged with the signal and the step, ended KILLED; the resumed
        job continues the same MLflow run (RUNNING again). The wait for the server is short (STOP_FLUSH_S): the
        launcher's SIGKILL follows its SIGTERM (30 s for `deepspeed`, Slurm's KillWait); what is not sent is in
        metrics.jsonl."""
        self.set_tags(
            {
                "swin.stopped": f"{stop.signal_name} at step {stop.step} ({stop.during})",
                "swin.stopped_step": str(stop.step),
                "swin.stopped_signal": stop.signal_name,
            }
        )
        self.finish("KILLED", timeout=min(STOP_FLUSH_S, self.cfg.tracking.final_timeout_s))

    def failed(self, e: BaseException) -> None:
        """Crashed: the redacted first line of its error as a tag, ended FAILED (KILLED for Ctrl-C)."""
        if isinstance(e, KeyboardInterrupt):
            self.finish("KILLED", timeout=min(STOP_FLUSH_S, self.cfg.tracking.final_timeout_s))
            return
        self.set_tags({"swin.error": f"{type(e).__name__}: {short_error(e)}"})
        self.finish("FAILED")

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Final artifacts, then waits (bounded: `timeout`, else tracking.final_timeout_s) for everything to
        reach the server; True when all did."""
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics: %s", short_error(e))
        if self.sender is None:
            return True
        self.sender.call(self.sender.client.set_terminated, self.run_id, status)
        timeout = self.cfg.tracking.final_timeout_s if timeout is None else timeout
        done = self.sender.close(timeout)
        if not done:
            log.warning(
                "MLflow: %d records could not be sent within %d s; they are in %s",
                self.sender.pending(),
                timeout,
                self.cfg.run_dir / "metrics.jsonl",
            )
        return done
