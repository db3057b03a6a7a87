"""The MLflow store as one value (pipeline/tracking/store.py): the training resolver's precedence, relative local
stores taken against the launch folder, what a read-only command accepts, redaction and identity. Pure functions:
no MLflow, no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.tracking.store import (
    LOCAL,
    SERVER,
    StoreNotFound,
    TrackingError,
    absolute_location,
    check_nodes,
    reading_store,
    resolve_store,
    store_at,
    ui_address,
)

SERVER_URI = "http://trainer:s3cret-pw@mlflow.example:5000/"


def test_precedence_env_then_config_then_the_local_store_in_out_dir(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://env.example:5000"}
    assert (
        resolve_store("http://config.example:5000", tmp_path / "runs", tmp_path, env).uri == "http://env.example:5000"
    )
    assert (
        resolve_store("http://config.example:5000", tmp_path / "runs", tmp_path, {}).uri == "http://config.example:5000"
    )
    assert (
        resolve_store("http://config.example:5000", "runs", tmp_path, {"MLFLOW_TRACKING_URI": ""}).uri
        == "http://config.example:5000"
    )  # set but empty: unset
    default = resolve_store("", "runs", tmp_path, {})
    assert default.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    assert (default.kind, default.path) == (LOCAL, tmp_path / "runs" / "mlflow" / "mlflow.db")
    assert default.artifacts == (tmp_path / "runs" / "mlflow" / "artifacts").as_uri()


@pytest.mark.parametrize(
    "written, uri, path",
    [
        ("sqlite:///mlflow.db", "sqlite:///{base}/mlflow.db", "{base}/mlflow.db"),
        ("sqlite:///./db/../mlflow.db", "sqlite:///{base}/mlflow.db", "{base}/mlflow.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db", "/abs/mlflow.db"),
        ("sqlite:///mlflow.db?timeout=30", "sqlite:///{base}/mlflow.db?timeout=30", "{base}/mlflow.db"),
        ("file:mlruns", "file://{base}/mlruns", "{base}/mlruns"),
        ("file:///abs/mlruns", "file:///abs/mlruns", "/abs/mlruns"),
        ("file:/abs/mlruns", "file:/abs/mlruns", "/abs/mlruns"),
        ("mlruns", "{base}/mlruns", "{base}/mlruns"),
        ("../mlruns", "{parent}/mlruns", "{parent}/mlruns"),
        ("/abs/mlruns", "/abs/mlruns", "/abs/mlruns"),
    ],
)
def test_a_relative_local_store_is_the_launch_folders(tmp_path, written, uri, path):
    base = tmp_path / "launched"
    base.mkdir()
    names = {"base": base, "parent": tmp_path}
    for store in (
        store_at(written, base),
        resolve_store("", "runs", base, {"MLFLOW_TRACKING_URI": written}),
        resolve_store(written, "runs", base, {}),
    ):
        assert store.kind == LOCAL and store.uri == uri.format(**names), store
        assert store.path == Path(path.format(**names)) and store.path.is_absolute()
        assert store.artifacts in (None, (base / "runs" / "mlflow" / "artifacts").as_uri())


def test_a_server_is_kept_as_written_and_named_without_credentials(tmp_path):
    store = resolve_store("", "runs", tmp_path, {"MLFLOW_TRACKING_URI": SERVER_URI})
    assert (store.kind, store.uri, store.path, store.artifacts) == (SERVER, SERVER_URI, None, None)
    assert "s3cret-pw" not in store.redacted and store.redacted.startswith("http://trainer:***@mlflow.example:5000")
    assert store.identity == "http://mlflow.example:5000"
    db = store_at("postgresql://bob:pw-in-url@db.example/mlflow", tmp_path)  # a database server: shared, not local
    assert db.kind == SERVER and db.identity == "postgresql://db.example/mlflow" and "pw-in-url" not in db.redacted
    token = store_at("https://mlflow.example/?token=abcdef123456", tmp_path)
    assert "abcdef123456" not in token.redacted and token.identity == "https://mlflow.example"


def test_two_spellings_of_one_local_store_have_one_identity(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    other = tmp_path / "elsewhere"
    other.mkdir()
    sqlite = {
        store_at(uri, base).identity
        for uri, base in [
            ("sqlite:///mlflow.db", tmp_path / "real"),
            (f"sqlite:///{tmp_path / 'real' / 'mlflow.db'}", other),
            ("sqlite:///../real/./mlflow.db", other),
            (f"sqlite:///{tmp_path / 'link' / 'mlflow.db'}", other),
        ]
    }
    assert sqlite == {f"sqlite:///{tmp_path / 'real' / 'mlflow.db'}"}
    folders = {
        store_at(uri, base).identity
        for uri, base in [
            ("mlruns", tmp_path / "real"),
            ("file:mlruns", tmp_path / "real"),
            ((tmp_path / "real" / "mlruns").as_uri(), other),
            (str(tmp_path / "link" / "mlruns"), other),
        ]
    }
    assert folders == {(tmp_path / "real" / "mlruns").as_uri()}
    assert (
        store_at("http://Host.example:5000/", tmp_path).identity
        == store_at("http://user:pw@host.example:5000", tmp_path).identity
    )


def test_artifact_location_configured_default_and_server(tmp_path):
    assert absolute_location("art", tmp_path) == str(tmp_path / "art")
    assert absolute_location("s3://bucket/art", tmp_path) == "s3://bucket/art" and absolute_location("", tmp_path) == ""
    assert resolve_store("", "runs", tmp_path, {}, "art").artifacts == (tmp_path / "art").as_uri()
    assert resolve_store("http://h:1", "runs", tmp_path, {}, "s3://b/a").artifacts == "s3://b/a"
    assert resolve_store("http://h:1", "runs", tmp_path, {}).artifacts is None  # the server keeps its own


def test_a_read_names_a_store_that_is_there(tmp_path):
    with pytest.raises(StoreNotFound, match="no MLflow store given"):
        reading_store(None, {}, tmp_path)
    with pytest.raises(StoreNotFound, match=f"no MLflow store at {tmp_path / 'mlflow.db'}"):
        reading_store("sqlite:///mlflow.db", {}, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").touch()
    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    assert reading_store(None, env, tmp_path).path == tmp_path / "mlflow.db"
    assert reading_store("http://given:1", env, tmp_path).uri == "http://given:1"  # --tracking-uri first
    assert reading_store(None, env, tmp_path, recorded="http://recorded:1").path == tmp_path / "mlflow.db"
    assert reading_store(None, {}, tmp_path, recorded="http://recorded:1").uri == "http://recorded:1"


def test_launch_resolves_the_store_once_without_touching_the_environment(tmp_path, monkeypatch):
    """resolve_at_launch takes MLFLOW_TRACKING_URI (relative: the launch folder's) into the store it returns, which
    the train command hands to every step that uses it; the config records it and the environment is left as it
    was."""
    from pipeline.config import load_config
    from pipeline.train import resolve_at_launch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    cfg = load_config(overrides=["out_dir=runs", "tracking.uri=http://ignored:1"])
    store = resolve_at_launch(cfg, str(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///mine.db"
    assert store.uri == f"sqlite:///{tmp_path / 'mine.db'}" == cfg.tracking.uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    plain = load_config(overrides=["out_dir=runs"])
    assert resolve_at_launch(plain, str(tmp_path)).path == tmp_path / "runs" / "mlflow" / "mlflow.db"
    assert plain.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"


def test_one_node_only_for_a_local_store_and_where_to_look(tmp_path):
    local, server = store_at("mlruns", tmp_path), store_at(SERVER_URI, tmp_path)
    check_nodes(local, ["a"])
    check_nodes(server, ["a", "b"])
    with pytest.raises(TrackingError, match="runs on 2 nodes"):
        check_nodes(local, ["a", "b"])
    assert (
        ui_address(local, "3") == f"mlflow ui --backend-store-uri {tmp_path / 'mlruns'}, then "
        f"http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    )
    assert ui_address(server, "3") == f"{server.redacted.rstrip('/')}/#/experiments/3?workflowType=machine_learning"
    assert "s3cret-pw" not in ui_address(server, None)
