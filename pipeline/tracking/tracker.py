"""MLflow tracking of a training run, that never stops the training.

- Rank 0 creates the MLflow run (or, when the job resumes a checkpoint, reopens the run recorded in
  `<run>/mlflow_run.json`) and broadcasts its id; every node's local rank 0 logs MLflow system metrics into it
  with its host name as node id.
- Params: the resolved config (flattened), world size, DeepSpeed config, the shard manifest's hash and counts,
  package versions; tags: git commit and dirty flag. Artifacts: config.yaml, metrics.jsonl and training
  curves (PNG) at the end. Metrics: what the loop logs, at the optimizer step.
- Every call to the server goes through one background thread with short HTTP timeouts. If the server goes
  away, a warning is logged, metrics wait in memory (they are in metrics.jsonl too) and are sent when it is
  back; at the end the run waits a bounded time for them.
- Secrets never reach MLflow or the run's folder: params whose key looks like a key/token/secret/password are
  blanked, and every param, tag, the config.yaml artifact and `mlflow_run.json` go through the project's one
  redaction function (swin_common.redact.redact_text: URI passwords, query-string tokens, secret environment
  values). `mlflow_run.json` holds the redacted tracking URI; a resumed job compares redacted forms.
- The tracking URI: MLFLOW_TRACKING_URI, else `tracking.uri`, else a local store beside the runs
  (`<out_dir>/mlflow/mlflow.db`, artifacts in `<out_dir>/mlflow/artifacts`).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

from swin_common.errors import UserError
from swin_common.redact import REDACTED, SECRET_NAME, redact_text, remember_secrets, secret_values

log = logging.getLogger("pipeline.tracking")
STOP_FLUSH_S = 10.0  # how long a stopped run waits for MLflow before exiting (see Tracker.stopped)
# Fail fast per request (the sender thread retries on its own schedule); users can set their own values.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# -- secrets (the text rules live in swin_common.redact; this adds the rule for param names) -----------------
def redact(params: dict[str, object], env: dict[str, str] | None = None) -> dict[str, str]:
    """String values safe to send to MLflow: secret-looking keys blanked, every value through redact_text
    (URI passwords, query-string tokens, secret environment values of `env`, default this process's)."""
    secrets = secret_values(env)
    return {k: REDACTED if SECRET_NAME.search(k.rsplit(".", 1)[-1]) else redact_text(str(v), secrets)
            for k, v in params.items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- what a run records ------------------------------------------------------------------------------------
# MLflow 3's UI: an experiment without this tag opens as a GenAI one (traces, no runs); since 3.x's workflow
# switch (GenAI | Model training, default GenAI, kept per browser) a link picks the view with UI_VIEW
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
UI_VIEW = "?workflowType=machine_learning"


def ui_link(base: str, experiment_id: str | None) -> str:
    """The MLflow UI page of an experiment in the model-training view (its runs): base is the UI's address."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{UI_VIEW}" if experiment_id else base


def tracking_uri(configured: str, out_dir: str | Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    return uri or f"sqlite:///{local_store(out_dir) / 'mlflow.db'}"


def local_store(out_dir: str | Path) -> Path:
    return Path(out_dir).resolve() / "mlflow"


def absolute_store_uri(uri: str, base: Path) -> str:
    """A local store named relatively (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) made absolute against
    `base`, the folder the user launched from: the launch scripts change to the repository, and a relative store
    would land in the checkout. Servers and absolute stores are returned as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (base / uri[len("file:"):]).resolve().as_uri()
    if uri and "://" not in uri and not uri.startswith(("file:", "/")):
        return str((base / uri).resolve())
    return uri


def git_state(repo: Path) -> dict[str, str]:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from swin_common.gpu import dali_package

    out = {}
    dali = dali_package()  # whichever DALI wheel is installed (nvidia-dali-cuda120, -cuda130, ...)
    if dali is not None:
        out[f"version.{dali[0]}"] = dali[1]
    for name in ("torch", "timm", "deepspeed", "mlflow", "numpy"):
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            pass
    return out


def manifest_params(shards: str) -> dict[str, object]:
    """Hash and counts of the shard set's manifest (its identity for this run)."""
    import hashlib

    from data_prep.shardset.store import open_store

    try:
        raw = open_store(shards).read("manifest.json")
    except Exception as e:  # noqa: BLE001  (recorded, never fatal)
        return {"data.manifest_error": str(e)[:200]}
    manifest = json.loads(raw)
    out = {"data.manifest_sha256": hashlib.sha256(raw).hexdigest(),
           "data.num_classes": len(manifest.get("synsets", manifest.get("layout", {}).get("synsets", [])))}
    for split, totals in manifest.get("totals", {}).items():
        out[f"data.{split}_samples"] = totals.get("samples")
        out[f"data.{split}_shards"] = totals.get("shards")
    return out


class TrackingError(UserError, RuntimeError):
    """A tracking set-up that cannot work for this job."""


def node_name() -> str:
    """This node's name in the run (system metrics, the multi-node check): SWIN_NODE_NAME, else the host name."""
    return os.environ.get("SWIN_NODE_NAME") or socket.gethostname()


def is_local_store(uri: str) -> bool:
    """A store MLflow writes to as files on this machine (SQLite, a folder), not a tracking server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


# -- the background sender ---------------------------------------------------------------------------------
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
        from mlflow.entities import Metric

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
                    batch = self.metrics[:500]
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
                    with self.lock:
                        del self.metrics[:len(batch)]
                    self.sent_metrics += len(batch)
                if self.failing_since is not None:
                    log.warning("MLflow is reachable again after %.0f s; sending the %d records kept meanwhile",
                                time.time() - self.failing_since, self.pending())
                    self.failing_since = None
                delay = 1.0
                if current is None and self.ops.empty() and not self.metrics:
                    self.stop.wait(0.5)
            except Exception as e:  # noqa: BLE001  (keep the records, try again later)
                if rejected(e):  # the server answered "no" to this call: retrying it cannot help
                    if current is not None:
                        log.warning("MLflow refused a call, skipped: %s", _short(e))
                        current = None
                    else:  # drop the batch it answered, not the records queued after it
                        log.warning("MLflow refused a batch of %d metrics, skipped: %s", len(batch), _short(e))
                        with self.lock:
                            del self.metrics[:len(batch)]
                    continue
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning("MLflow unreachable (%s); training goes on, %d records kept to send later "
                                "(they are in metrics.jsonl too)", _short(e), self.pending())
                time.sleep(delay)  # not stop.wait: once closing, stop is set and would make this spin
                delay = min(delay * 2, 30.0)

    def close(self, timeout: float) -> bool:
        """Waits up to `timeout` s for everything to be sent; True when nothing is left."""
        self.stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()


def rejected(e: Exception) -> bool:
    """An MLflow error the server (or store) gave as an answer (4xx), as opposed to not being reachable."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


def short_error(e: Exception) -> str:
    """The first line of an error, at most 200 characters."""
    return _short(e)


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return redact_text(text)[:200]


# -- the tracker -------------------------------------------------------------------------------------------
class Tracker:
    """One per rank; only rank 0 talks to MLflow (plus each node's local rank 0, for system metrics)."""

    def __init__(self, cfg, world, resumed: bool, extra_params: dict | None = None):
        from pipeline.engine.distributed import all_gather_object, broadcast_object

        self.cfg, self.world = cfg, world
        self.enabled = cfg.tracking.enabled
        self.uri = tracking_uri(cfg.tracking.uri, cfg.out_dir) if self.enabled else ""
        remember_secrets(self.uri)  # its password is cut from all text, in whatever form it shows up
        nodes = sorted(set(all_gather_object(node_name())))  # every rank takes part, so every rank decides alike
        if self.enabled and len(nodes) > 1 and is_local_store(self.uri):
            raise TrackingError(
                f"this job runs on {len(nodes)} nodes ({', '.join(nodes[:4])}{' ...' if len(nodes) > 4 else ''}) "
                f"and MLflow would write to a file store on each ({redact_text(self.uri)}), which is for one "
                f"machine: start a tracking server (scripts/start_mlflow_server.sh, or any MLflow server) and set "
                f"MLFLOW_TRACKING_URI=http://HOST:PORT for every rank, or set tracking.enabled=false")
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
            self._start_system_metrics()

    def _open_run(self, resumed: bool, extra_params: dict) -> str | None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        record = self.cfg.run_dir / "mlflow_run.json"
        deadline = time.time() + self.cfg.tracking.start_timeout_s
        while True:
            try:
                client = MlflowClient(self.uri)
                previous = json.loads(record.read_text()) if resumed and record.is_file() else None
                # the record holds the redacted URI (older records the full one): compare redacted forms
                if previous and redact_text(previous.get("tracking_uri", "")) == redact_text(self.uri):
                    run_id = previous["run_id"]
                    client.update_run(run_id, status="RUNNING")
                    self.experiment_id = client.get_run(run_id).info.experiment_id
                    log.info("MLflow: continuing run %s at %s", run_id, redact_text(self.uri))
                    new = False
                else:
                    run_id = self._create_run(client, mlflow)
                    new = True
                break
            except Exception as e:  # noqa: BLE001
                if time.time() > deadline:
                    log.warning("MLflow at %s unreachable (%s): this run is not tracked (metrics.jsonl has "
                                "everything)", redact_text(self.uri), _short(e))
                    return None
                time.sleep(2)
        staged = record.with_name(record.name + ".tmp")  # renamed, so a reader never sees it half written
        staged.write_text(json.dumps({"run_id": run_id, "tracking_uri": redact_text(self.uri),
                                      "experiment_id": self.experiment_id}) + "\n")
        os.replace(staged, record)
        self.run_id, self.sender = run_id, Sender(client, run_id)
        if new:
            from pipeline.config import config_to_dict

            params = {**flatten(config_to_dict(self.cfg)), "world_size": self.world.size, **extra_params}
            for k, v in list(params.items()):
                if isinstance(v, (list, tuple)):
                    params[k] = ",".join(map(str, v))
            self.log_params(params)
            self.sender.call(client.log_text, run_id, redact_text((self.cfg.run_dir / "config.yaml").read_text(),
                                                                   self.secrets), "config.yaml")
        return run_id

    def _create_run(self, client, mlflow) -> str:
        name = self.cfg.tracking.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if self.cfg.tracking.artifact_location or is_local_store(self.uri):  # a server keeps its own
                where = self.cfg.tracking.artifact_location or str(local_store(self.cfg.out_dir) / "artifacts")
                location = where if "://" in where else Path(where).resolve().as_uri()
            experiment_id = client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            experiment_id = experiment.experiment_id
            if not (experiment.tags or {}).get(EXPERIMENT_KIND):  # made by another tool, or before the tag
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
        tags = {"mlflow.runName": self.cfg.name, **git_state(Path(__file__).resolve().parents[2]),
                "run_dir": str(self.cfg.run_dir.resolve())}
        run = client.create_run(experiment_id, run_name=self.cfg.name, tags=redact(tags))
        self.experiment_id = str(experiment_id)
        log.info("MLflow: run %s (experiment %s) at %s", run.info.run_id, name, redact_text(self.uri))
        return run.info.run_id

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.tracking.system_metrics_s,
                                                node_id=node_name(), tracking_uri=self.uri,
                                                resume_logging=True)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow system metrics not started: %s", _short(e))
            return
        if not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in self.monitor.monitors):
            log.info("MLflow system metrics: no GPU metrics on %s (%s)", node_name(), gpu_metrics_off_reason())

    # -- recording -----------------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        if self.sender is None:
            return
        from mlflow.entities import Param

        safe = redact(params)
        items = [Param(k, v[:6000]) for k, v in safe.items()]
        for i in range(0, len(items), 100):
            self.sender.call(self.sender.client.log_batch, self.run_id, params=items[i:i + 100])

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
        import threading

        reached = threading.Event()
        self.sender.call(reached.set)
        if not reached.wait(timeout):
            log.warning("MLflow: %d records still queued after %.0f s; they are sent later, and are in %s",
                        self.sender.pending(), timeout, self.cfg.run_dir / "metrics.jsonl")
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
        self.set_tags({"swin.stopped": f"{stop.signal_name} at step {stop.step} ({stop.during})",
                       "swin.stopped_step": str(stop.step), "swin.stopped_signal": stop.signal_name})
        self.finish("KILLED", timeout=min(STOP_FLUSH_S, self.cfg.tracking.final_timeout_s))

    def failed(self, e: BaseException) -> None:
        """Crashed: the redacted first line of its error as a tag, ended FAILED (KILLED for Ctrl-C)."""
        if isinstance(e, KeyboardInterrupt):
            self.finish("KILLED", timeout=min(STOP_FLUSH_S, self.cfg.tracking.final_timeout_s))
            return
        self.set_tags({"swin.error": f"{type(e).__name__}: {_short(e)}"})
        self.finish("FAILED")

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Final artifacts, then waits (bounded: `timeout`, else tracking.final_timeout_s) for everything to
        reach the server; True when all did."""
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics: %s", _short(e))
        if self.sender is None:
            return True
        self.sender.call(self.sender.client.set_terminated, self.run_id, status)
        timeout = self.cfg.tracking.final_timeout_s if timeout is None else timeout
        done = self.sender.close(timeout)
        if not done:
            log.warning("MLflow: %d records could not be sent within %d s; they are in %s",
                        self.sender.pending(), timeout, self.cfg.run_dir / "metrics.jsonl")
        return done


def gpu_metrics_off_reason() -> str:
    """Why MLflow's GPU monitor is not running here (it says so only at debug level)."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed: pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"NVML found no NVIDIA driver or GPU: {e}"
    count = pynvml.nvmlDeviceGetCount()
    return "NVML sees no GPU" if count == 0 else f"NVML sees {count} GPU(s) but MLflow's monitor did not start"
