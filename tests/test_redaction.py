"""Secrets never leave the process: the one redaction function (swin_common.redact) and every place text leaves
a run: log lines, printed errors and tracebacks, mlflow_run.json, config dumps (run folder and checkpoints),
MLflow params, tags and artifacts, and what the MLflow server stores. Two real trainings with a password in the
tracking URI: one with the server unreachable, one with a real `mlflow server`; everything they wrote and printed
is searched for the secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import dump_config, load_config
from pipeline.tracking.params import redact
from runs import TINY, job_env, small
from servers import REPO, free_port
from swin_common.redact import REDACTED, redact_text, redact_tree, secret_values


# -- the rules ---------------------------------------------------------------------------------------------
def test_redaction_rules():
    env = {"AWS_SECRET_ACCESS_KEY": "abcdef123456", "HF_TOKEN": "hf_xyz789012", "HOME": "/root", "SHORT_KEY": "ab"}
    out = redact(
        {
            "db.password": "hunter22",
            "api_key": "x",
            "uri": "http://bob:pw123@host/x",
            "path": "/data/abcdef123456/x",
            "home": "/root",
            "n": 3,
        },
        env,
    )
    assert out == {
        "db.password": "***",
        "api_key": "***",
        "uri": "http://bob:***@host/x",
        "path": "/data/***/x",
        "home": "/root",
        "n": "3",
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "MLflow at http://alice:s3cr3t@127.0.0.1:5000/ unreachable",
            "MLflow at http://alice:***@127.0.0.1:5000/ unreachable",
        ),
        ("http://alice:p@ss@host:1/api", "http://alice:***@host:1/api"),  # an '@' in the password: cut whole
        (
            "'postgresql://u:pw@db/x', 'http://h:5000/api', bob@example.com",
            "'postgresql://u:***@db/x', 'http://h:5000/api', bob@example.com",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&X-Amz-Date=1"
            "&X-Amz-Security-Token=FQo&X-Amz-Signature=abc123",
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=1"
            "&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "https://a.blob.core.windows.net/c/b?sv=2020&sig=AbC%3D&se=2030",
            "https://a.blob.core.windows.net/c/b?sv=2020&sig=***&se=2030",
        ),
        (
            "GET /x?token=t0k&page=2&access_token=a&api_key=k&client_secret=c&password=p",
            "GET /x?token=***&page=2&access_token=***&api_key=***&client_secret=***&password=***",
        ),
        (
            "{'Authorization': 'Bearer eyJhbGci.x.y'} Authorization: Basic dXNlcjpwdw==",
            "{'Authorization': 'Bearer ***'} Authorization: Basic ***",
        ),
        (
            "git clone https://ghp_T0kenValue@github.com/o/r and http://***@h:1/",
            "git clone https://***@github.com/o/r and http://***@h:1/",
        ),  # a user part without a password is a token: cut whole (and twice is the same)
        (
            "s3://bucket/prefix http://host:5000/path?x=1 /data/shards",  # nothing secret: unchanged
            "s3://bucket/prefix http://host:5000/path?x=1 /data/shards",
        ),
    ],
)
def test_uri_credentials_are_cut(text, expected):
    assert redact_text(text, []) == expected
    assert redact_text(expected, []) == expected  # idempotent


def test_secrets_from_the_environment_are_cut_wherever_they_appear():
    env = {
        "MLFLOW_TRACKING_URI": "http://bob:Hunter-2-pw@mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "other-pw-99",
        "DATA_URL": "https://x/y?X-Amz-Signature=sig-value-123",
        "PATH": "/usr/bin",
    }
    secrets = secret_values(env)
    assert set(secrets) == {"Hunter-2-pw", "other-pw-99", "sig-value-123"}
    text = "password Hunter-2-pw, other-pw-99 and sig-value-123 seen bare in /usr/bin"
    assert redact_text(text, secrets) == "password ***, *** and *** seen bare in /usr/bin"
    assert redact_tree({"a": ["x Hunter-2-pw", 3, ("other-pw-99",)]}, secrets) == {"a": ["x ***", 3, ("***",)]}


def test_config_dumps_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456789")
    cfg = load_config(
        TINY,
        [
            "tracking.uri=http://bob:pw-in-config@mlflow:5000",
            "data.shards=s3://b/p?X-Amz-Signature=abcdef&x=1",
            "data.cache_dir=/tmp/c-tok-123456789",
        ],
    )
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "pw-in-config" not in text and "abcdef" not in text and "tok-123456789" not in text
    back = load_config(tmp_path / "config.yaml")  # still a valid config
    assert back.tracking.uri == "http://bob:***@mlflow:5000" and back.data.cache_dir == "/tmp/c-***"
    assert back.data.shards == "s3://b/p?X-Amz-Signature=***&x=1" and back.model == cfg.model


def test_everything_a_command_writes_is_redacted():
    """Log lines (ours and a library's own handler), print, warnings, the one-line error and a bug's traceback."""
    script = r"""
import logging, sys, warnings
from swin_common.cli import command, configure_logging, CommandError
uri = "http://bob:Sekrit-pw-1@127.0.0.1:1/?token=tok-abc-123"

@command()
def main(argv=None):
    configure_logging(level=logging.INFO, stream=sys.stderr)
    own = logging.getLogger("lib"); own.propagate = False
    h = logging.StreamHandler(sys.stderr); own.addHandler(h)   # a library's own handler, added later
    logging.getLogger("x").info("log %s", uri)
    own.warning("lib %s", uri)
    print("print", uri)
    warnings.warn("warn " + uri)
    if argv[0] == "expected":
        raise CommandError("cannot use " + uri)
    raise KeyError("bug " + uri)

sys.exit(main(sys.argv[1:]))
"""
    for kind, code in (("expected", 2), ("bug", 1)):
        proc = subprocess.run(
            [sys.executable, "-c", script, kind],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == code, out
        assert "Sekrit-pw-1" not in out and "tok-abc-123" not in out, out
        assert out.count("bob:***@127.0.0.1:1/?token=***") == 5, out
        assert ("Traceback" in proc.stderr) == (kind == "bug")


# -- real runs ---------------------------------------------------------------------------------------------
def train(shards, out, name, *extra, **env) -> subprocess.CompletedProcess:
    """One rank, a couple of steps of the tiny recipe."""
    args = small(shards, out, name, "tracking.system_metrics_s=1", *extra, tracked=True)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=job_env(port=False, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", **env),
    )


def with_userinfo(uri: str, user: str, password: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def leaks(secrets: list[str], texts: dict[str, str], folders: list[Path]) -> list[str]:
    """Where any secret appears: in the named texts, or in any file (bytes) under the folders."""
    found = [f"{where}: {s}" for where, text in texts.items() for s in secrets if s in text]
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


@pytest.mark.slow
def test_password_in_the_tracking_uri_with_the_server_unreachable(shards, tmp_path):
    password = "Unreach-PW-4471"
    uri = f"http://trainer:{password}@127.0.0.1:{free_port()}/"
    proc = train(
        shards,
        tmp_path,
        "offline",
        "train.max_steps=2",
        "tracking.start_timeout_s=1",
        f"tracking.uri={uri}",
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "this run is not tracked" in proc.stderr and "trainer:***@127.0.0.1" in proc.stderr, proc.stderr[-3000:]
    run_dir = tmp_path / "offline"
    assert not (run_dir / "mlflow_run.json").exists()
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "trainer:***@" in (run_dir / "config.yaml").read_text()
    assert not leaks([password], {"stdout": proc.stdout, "stderr": proc.stderr}, [tmp_path])

    # the one-line error of a command that needs the server names it, redacted
    pulled = subprocess.run(
        [sys.executable, "-m", "pipeline.pull", "models:/offline@candidate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        },
    )
    assert pulled.returncode == 2 and "cannot reach the MLflow server at http://trainer:***@" in pulled.stderr
    assert not leaks([password], {"stdout": pulled.stdout, "stderr": pulled.stderr}, [])


@pytest.mark.slow
def test_password_in_the_tracking_uri_with_a_real_server(mlflow_server, shards, tmp_path):
    """userinfo in front of an unauthenticated server works for MLflow's client (requests sends it as basic
    auth, which the server ignores); a token and secret environment variables ride along. Nothing the run
    wrote or printed, and nothing the server stored, holds any of them; a resumed job continues the same run
    from the redacted record; `register` needs MLFLOW_TRACKING_URI then, and says so."""
    password, token, aws, own = "Reach-PW-9913", "tok-TRACKING-5521", "s3cr3t-VALUE-0123456789", "tok-ABCDEF987654"
    secrets = [password, token, aws, own]
    uri = with_userinfo(mlflow_server.uri, "trainer", password)
    envs = {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_TOKEN": token,
        "AWS_SECRET_ACCESS_KEY": aws,
        "MY_SERVICE_TOKEN": own,
    }
    first = train(
        shards,
        tmp_path,
        "secretive",
        "train.max_steps=2",
        f"tracking.uri={uri}",
        f"data.cache_dir=/tmp/cache-{aws}",
        **envs,
    )
    assert first.returncode == 0, first.stderr[-4000:]
    run_dir = tmp_path / "secretive"
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    assert record["tracking_uri"] == with_userinfo(mlflow_server.uri, "trainer", REDACTED)
    run_id = record["run_id"]

    resumed = train(
        shards,
        tmp_path,
        "secretive",
        "train.max_steps=3",
        f"tracking.uri={uri}",
        f"data.cache_dir=/tmp/cache-{aws}",
        **envs,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"continuing run {run_id}" in resumed.stderr
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]
    params = run.data.params
    assert params["tracking.uri"] == record["tracking_uri"] and params["data.cache_dir"] == "/tmp/cache-***"
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    assert (artifacts / "config.yaml").is_file()
    version = client.get_model_version_by_alias("secretive", "candidate")
    stored = json.dumps([params, run.data.tags, dict(version.tags), version.description, version.source])

    # register by hand: the record's URI lacks the password, so MLFLOW_TRACKING_URI must give it
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    no_uri = subprocess.run(
        [sys.executable, "-m", "pipeline.register", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert no_uri.returncode == 2 and "MLFLOW_TRACKING_URI" in no_uri.stderr, no_uri.stderr
    assert len([line for line in no_uri.stderr.splitlines() if line.strip()]) == 1
    by_hand = subprocess.run(
        [sys.executable, "-m", "pipeline.register", str(run_dir), "--alias", "manual"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **envs},
    )
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert client.get_model_version_by_alias("secretive", "manual").version == version.version

    texts = {
        "train stdout": first.stdout + resumed.stdout,
        "train stderr": first.stderr + resumed.stderr,
        "mlflow records": stored,
        "register": no_uri.stdout + no_uri.stderr + by_hand.stdout + by_hand.stderr,
    }
    assert not leaks(secrets, texts, [run_dir, artifacts, mlflow_server.state_dir])
