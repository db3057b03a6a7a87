"""The MLflow store a command talks to, as one value (Store), resolved once where the command starts and passed down.

Two resolvers, one set of rules for what a URI names (store_at):
- resolve_store: a training run's store. MLFLOW_TRACKING_URI, else `tracking.uri`, else a local store beside the
  runs (`<out_dir>/mlflow/mlflow.db`, artifacts in `<out_dir>/mlflow/artifacts`). A local store named relatively
  (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) is taken against the folder the user launched from: the launch
  scripts change to the repository, and a relative store would land in the checkout.
- reading_store: the store of a command that only reads the registry (pull, predict, evaluate, register):
  --tracking-uri, else MLFLOW_TRACKING_URI, else (register) the store the run recorded; never MLflow's own default
  (a `mlflow.db` it would create in the current folder) and never a local store that is not there (MLflow creates
  a missing sqlite file or mlruns folder on first use, and a read must not).

Nothing here writes the environment: a child process that needs the store gets it in its own environment from the
one place that starts it (pipeline/demo.py: stage_env).

This module imports no MLflow (a command's --help stays fast).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

from swin_common.errors import UserError
from swin_common.redact import redact_text

log = logging.getLogger(__name__)
ENV_VAR = "MLFLOW_TRACKING_URI"
StoreKind = Literal["local", "server"]
LOCAL: Final = "local"  # a sqlite file or a folder on this machine
SERVER: Final = "server"  # http(s), a database server, ...
LOCAL_DIR = "mlflow"  # <out_dir>/mlflow: the local store of a run that names none
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# MLflow 3.x's UI has a workflow switch (GenAI | Model training, default GenAI, kept per browser): a link picks the
# model-training view
UI_VIEW = "?workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


class StoreNotFound(UserError, ValueError):
    """No MLflow store to read from: none named, or a local one that does not exist (never created by a read)."""


class TrackingError(UserError, RuntimeError):
    """A tracking set-up that cannot work for this job."""


@dataclass(frozen=True)
class Store:
    """One MLflow store: what MLflow's client gets, how to name it in logs and errors, and what it is."""

    kind: StoreKind  # LOCAL (a sqlite file or a folder on this machine) | SERVER (http(s), a database server, ...)
    uri: str  # what MLflow's client gets: a local store's absolute URI, a server's as given (credentials too)
    path: Path | None  # a local store's sqlite file or folder, absolute; None for a server (and in-memory sqlite)
    redacted: str  # the URI without credentials: for logs, errors and run records (swin_common.redact)
    identity: str  # names the store wherever a command runs: sqlite:///ABS, file:///ABS, or scheme://host:port/path
    # where an experiment this project creates keeps its artifacts (a URI); None: the server keeps its own
    artifacts: str | None = None

    @property
    def local(self) -> bool:
        return self.kind == LOCAL


def store_at(uri: str, base: Path) -> Store:
    """The store `uri` names. A local store named relatively is made absolute against `base` (`..` and symlinks
    resolved); an absolute one and a server's URI are kept as written."""
    if not uri:
        raise ValueError("an MLflow store URI cannot be empty")
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):  # sqlite:// (in memory) and other forms: nothing on disk to name
            return Store(LOCAL, uri, None, redact_text(uri), uri)
        rest, query = uri[len("sqlite:///") :], ""
        if "?" in rest:
            rest, query = rest.split("?", 1)
            query = "?" + query
        path = Path(rest)
        if not path.is_absolute():
            path = (base / path).resolve()
            uri = f"sqlite:///{path}{query}"
        return Store(LOCAL, uri, path, redact_text(uri), f"sqlite:///{path.resolve()}")
    if uri.startswith("file:"):
        path = Path(url2pathname(urlsplit(uri).path))
        if not path.is_absolute():
            path = (base / path).resolve()
            uri = path.as_uri()
        return Store(LOCAL, uri, path, redact_text(uri), path.resolve().as_uri())
    if "://" not in uri:  # a folder
        path = Path(uri)
        if not path.is_absolute():
            path = (base / path).resolve()
            uri = str(path)
        return Store(LOCAL, uri, path, redact_text(uri), path.resolve().as_uri())
    parts = urlsplit(uri)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    identity = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return Store(SERVER, uri, None, redact_text(uri), identity)


def absolute_location(location: str, base: Path) -> str:
    """An artifact location as configured, a folder named relatively made absolute against `base`; a URL (s3://,
    file://, ...) and "" stay as they are."""
    return str((base / location).resolve()) if location and "://" not in location else location


def resolve_store(
    configured: str, out_dir: str | Path, base: Path, env: Mapping[str, str], artifact_location: str = ""
) -> Store:
    """A training run's store: env's MLFLOW_TRACKING_URI, else `configured` (tracking.uri), else the local store
    `<out_dir>/mlflow/mlflow.db`; relative local stores, out_dir and artifact_location are taken against `base`
    (the launch folder). Its artifacts: `artifact_location` (tracking.artifact_location) when set, else for a
    local store `<out_dir>/mlflow/artifacts`, else None (a server keeps its own)."""
    out = (base / out_dir).resolve() / LOCAL_DIR
    uri = env.get(ENV_VAR) or configured or f"sqlite:///{out / DB_FILE}"
    store = store_at(uri, base)
    location = absolute_location(artifact_location, base)
    artifacts: str | None
    if location:
        artifacts = location if "://" in location else Path(location).resolve().as_uri()
    else:
        artifacts = (out / ARTIFACTS_DIR).resolve().as_uri() if store.local else None
    return replace(store, artifacts=artifacts)


def reading_store(given: str | None, env: Mapping[str, str], base: Path, recorded: str | None = None) -> Store:
    """The store of a command that only reads: `given` (--tracking-uri), else env's MLFLOW_TRACKING_URI, else
    `recorded` (the store a run recorded); relative local stores against `base` (the current folder). Raises
    StoreNotFound when none is named or a local one is not there."""
    uri = given or env.get(ENV_VAR) or recorded
    if not uri:
        raise StoreNotFound(
            f"no MLflow store given: set {ENV_VAR} (http://HOST:PORT, or sqlite:////path/to/mlflow.db "
            f"for a local store) or pass --tracking-uri"
        )
    return existing(store_at(uri, base))


def existing(store: Store) -> Store:
    """`store`, when it can be read without creating it: a server, or a local store that is there. Raises
    StoreNotFound for a local one that is not."""
    if store.path is not None and not store.path.exists():
        raise StoreNotFound(
            f"no MLflow store at {store.path} ({store.redacted}): give the store the training wrote "
            f"(its runs/mlflow/mlflow.db, or the server's http://HOST:PORT)"
        )
    return store


def check_nodes(store: Store, nodes: list[str]) -> None:
    """Raises TrackingError when a job on several nodes would track to a local store (files on each node)."""
    if store.local and len(nodes) > 1:
        raise TrackingError(
            f"this job runs on {len(nodes)} nodes ({', '.join(nodes[:4])}{' ...' if len(nodes) > 4 else ''}) and "
            f"MLflow would write to a file store on each ({store.redacted}), which is for one machine: start a "
            f"tracking server (scripts/start_mlflow_server.sh, or any MLflow server) and set "
            f"{ENV_VAR}=http://HOST:PORT for every rank, or set tracking.enabled=false"
        )


def ui_link(base: str, experiment_id: str | None) -> str:
    """The MLflow UI page of an experiment in the model-training view (its runs): base is the UI's address."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{UI_VIEW}" if experiment_id else base


def ui_address(store: Store, experiment_id: str | None) -> str:
    """Where to look at a store's experiment: a server's page of it, or for a local store the `mlflow ui` command
    and that page on it."""
    if store.local:
        return f"mlflow ui --backend-store-uri {store.redacted}, then {ui_link(LOCAL_UI, experiment_id)}"
    return ui_link(store.redacted, experiment_id)
