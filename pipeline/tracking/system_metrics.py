"""MLflow system metrics of a run (CPU, GPU, memory, network), logged by every node's local rank 0 with its node
name as node id; when no GPU metrics can be taken, it says why once."""

from __future__ import annotations

import logging
import os
import socket

from pipeline.tracking.sender import short_error
from pipeline.tracking.store import Store

log = logging.getLogger(__name__)


def node_name() -> str:
    """This node's name in the run (system metrics, the multi-node check): SWIN_NODE_NAME, else the host name."""
    return os.environ.get("SWIN_NODE_NAME") or socket.gethostname()


def start_system_metrics(run_id: str, store: Store, interval_s: float):
    """MLflow's system metrics monitor for the run, started (resuming the run's earlier samples); None when it
    cannot start (a warning says why)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, node_id=node_name(), tracking_uri=store.uri, resume_logging=True
        )
        monitor.start()
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow system metrics not started: %s", short_error(e))
        return None
    if not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors):
        log.info("MLflow system metrics: no GPU metrics on %s (%s)", node_name(), gpu_metrics_off_reason())
    return monitor


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
