"""MLflow tracking and registry against real `mlflow server`s started on loopback (sqlite store; artifacts on
local disk and on the S3 server): a 2-rank training run's params, metrics, system metrics, plots and
registered model; a resumed job continuing its run; pull and predict in fresh processes; init_from=models:/;
a server stopped and restarted mid-run. Secrets kept out: tests/test_redaction.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from runs import LAUNCH, TINY, job_env, run_summary, small
from servers import REPO, free_port, start_mlflow_server
from stores import constant_export, local_store, register_export

pytestmark = pytest.mark.slow


def env(uri: str, **extra) -> dict[str, str]:
    return job_env(port=False, MLFLOW_TRACKING_URI=uri, **extra)


def train(shards, out, name, uri, *extra, ranks=2, check=True, **env_extra) -> subprocess.CompletedProcess:
    args = small(shards, out, name, "tracking.system_metrics_s=1", *extra, tracked=True)
    cmd = ["bash", LAUNCH] if ranks == 2 else [sys.executable, "-m", "pipeline.train"]
    proc = subprocess.run(
        [*map(str, cmd), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env(uri, MASTER_PORT=str(free_port()), **env_extra),
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def steps_of(client, run_id, key) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def a_digit_jpeg(digits_tars: Path, tmp_path: Path, digit: int) -> Path:
    with tarfile.open(digits_tars / f"n{digit:08d}.tar") as tar:
        member = next(m for m in tar.getmembers() if m.isfile())
        data = tar.extractfile(member).read()
    out = tmp_path / f"digit{digit}.jpg"
    out.write_bytes(data)
    return out


@pytest.fixture(scope="module")
def tracked(mlflow_server, shards, tmp_path_factory):
    """One tracked run in three jobs, and what each left: 4 steps (registered, aliases current and champion), the
    same command with more steps (resumed), and once more (complete: nothing to do, on one rank)."""
    uri, tmp_path = mlflow_server.uri, tmp_path_factory.mktemp("tracked")
    aliases = "tracking.aliases=[current, champion]"
    first = train(shards, tmp_path, "tracked", uri, "train.max_steps=4", aliases)
    client = MlflowClient(uri)
    run_dir = tmp_path / "tracked"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    out = {"uri": uri, "tmp_path": tmp_path, "run_dir": run_dir, "run_id": run_id, "client": client, "first": first}
    out["version"] = client.get_model_version_by_alias("tracked", "champion")
    out["first_current"] = client.get_model_version_by_alias("tracked", "current").version
    out["first_steps"] = {key: steps_of(client, run_id, key) for key in ("loss", "lr", "val_top1")}
    out["resumed"] = train(shards, tmp_path, "tracked", uri, "train.max_steps=6", aliases)
    out["resumed_run_id"] = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    out["resumed_loss_steps"] = steps_of(client, run_id, "loss")
    out["newest"] = client.get_model_version_by_alias("tracked", "current")
    out["metrics_before"] = (run_dir / "metrics.jsonl").read_bytes()
    # one rank: nothing is loaded, so nothing to convert either
    out["complete"] = train(shards, tmp_path, "tracked", uri, "train.max_steps=6", aliases, ranks=1)
    return out


def test_a_tracked_run_records_its_params_metrics_artifacts_and_version(tracked):
    client, run_id, run_dir, uri, version = (tracked[k] for k in ("client", "run_id", "run_dir", "uri", "version"))
    # no GPU here: said once, with the reason (NVML finds no driver), not silently left out
    gpu_off = [line for line in tracked["first"].stderr.splitlines() if "no GPU metrics on" in line]
    assert len(gpu_off) == 1 and "NVML" in gpu_off[0], gpu_off
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["model.arch"] == "swin_nano" and params["world_size"] == "2"
    assert params["deepspeed.zero_optimization.stage"] == "2" and params["train.zero_stage"] == "2"
    assert params["data.train_samples"] == "1697" and len(params["data.manifest_sha256"]) == 64
    assert params["version.torch"] == metadata.version("torch") and "version.deepspeed" in params
    assert params["version.nvidia-dali-cuda130"] == metadata.version("nvidia-dali-cuda130")  # the DALI it found
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    assert run.info.status == "FINISHED"
    assert tracked["first_steps"] == {"loss": [1, 2, 3, 4], "lr": [1, 2, 3, 4], "val_top1": [4]}
    node = socket.gethostname()  # system metrics carry the node id (one node here)
    assert any(k.startswith(f"system/{node}/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "plots")
    }
    assert {"config.yaml", "metrics.jsonl", "plots/training_curves.png", "model"} <= artifacts, artifacts
    assert version.run_id == run_id and version.tags["timm_name"] == "swin_nano_patch4_window4_64"
    # the run's summary names the version, its aliases, the run folder and where to look at it; times rounded
    summary = run_summary(tracked["first"].stdout)
    assert summary["registered"] == f"models:/tracked/{version.version}" and summary["mlflow_run"] == run_id
    assert summary["aliases"] == ["current", "champion"] and summary["run_dir"] == str(run_dir)
    # the experiment's page in the UI's model-training view (MLflow 3 opens the GenAI one by default)
    assert summary["mlflow_ui"] == f"{uri}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning"
    assert summary["seconds"] == round(summary["seconds"], 1)
    # cut short by train.max_steps: the version says so
    assert version.tags["stopped_before_schedule_end"].startswith("train.max_steps=4: 4 of the schedule's ")
    assert tracked["first_current"] == version.version


def test_a_resumed_job_continues_the_same_run_and_registers_a_new_version(tracked):
    assert tracked["resumed_run_id"] == tracked["run_id"]
    assert tracked["resumed_loss_steps"] == [1, 2, 3, 4, 5, 6]
    newest, version = tracked["newest"], tracked["version"]
    assert int(newest.version) == int(version.version) + 1 and newest.run_id == tracked["run_id"]


def test_a_complete_run_does_nothing_and_says_so_in_its_summary(tracked):
    client, run_dir, newest, done = tracked["client"], tracked["run_dir"], tracked["newest"], tracked["complete"]
    summary = run_summary(done.stdout)
    assert summary["complete"] is True and summary["steps"] == 6, summary
    assert summary["registered"] == f"models:/tracked/{newest.version}"
    assert (run_dir / "metrics.jsonl").read_bytes() == tracked["metrics_before"]
    assert len(client.search_model_versions("name='tracked'")) == 2  # versions 1 (step 4) and 2 (step 6) only
    assert client.get_model_version_by_alias("tracked", "current").version == newest.version


def test_registering_by_hand_adds_nothing_new_for_the_same_export(tracked):
    client, run_dir, newest, uri = tracked["client"], tracked["run_dir"], tracked["newest"], tracked["uri"]
    by_hand = subprocess.run(
        [sys.executable, "-m", "pipeline.register", run_dir, "--alias", "manual"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env(uri),
        timeout=300,
    )
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert by_hand.stdout.split()[0] == f"models:/tracked/{newest.version}"
    assert client.get_model_version_by_alias("tracked", "manual").version == newest.version
    missing = subprocess.run(
        [sys.executable, "-m", "pipeline.register", tracked["tmp_path"]],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env(uri),
        timeout=300,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_a_version_is_pulled_and_predicts_in_fresh_processes(tracked, digits_tars, tmp_path):
    uri, newest = tracked["uri"], tracked["newest"]
    cache = {"SWIN_MODEL_CACHE": str(tmp_path / "cache")}
    pulled = subprocess.run(
        [sys.executable, "-m", "pipeline.pull", "models:/tracked@current"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env(uri, **cache),
        timeout=300,
    )
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    folder = Path(pulled.stdout.strip().splitlines()[-1])
    assert (folder / "model.safetensors").is_file() and folder.parent.name == "tracked"
    assert json.loads((folder / "model.json").read_text())["num_classes"] == 10
    images = [a_digit_jpeg(digits_tars, tmp_path, d) for d in (3, 7)]
    predicted = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", f"models:/tracked/{newest.version}", *map(str, images)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env(uri, **cache),
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = predicted.stdout.splitlines()
    assert lines[0].endswith("digit3.jpg") and len(lines) == 2 * 6
    assert all(" n0000000" in line and "(class " in line for line in lines[1:6])


def test_fine_tuning_starts_from_the_registry_of_its_own_store(tracked, shards, tmp_path, monkeypatch):
    """Through a cache that already holds another store's models:/tracked/N (a dev store, or one made again): the
    run starts from this store's weights all the same."""
    from pipeline.tracking.registry import pull_to_folder
    from pipeline.tracking.store import store_at
    from swin_common.safe_weights import file_sha256

    client, uri = tracked["client"], tracked["uri"]
    champion = client.get_model_version_by_alias("tracked", "champion")
    other_store = local_store(tmp_path / "other_store")
    other = constant_export(tmp_path / "other_export", [f"n{d:08d}" for d in range(10)], 0, 5.0)
    for _ in range(int(champion.version)):
        register_export(other_store, "tracked", other)
    monkeypatch.setenv("SWIN_MODEL_CACHE", str(tmp_path / "fresh-cache"))
    pull_to_folder(f"models:/tracked/{champion.version}", store=store_at(other_store, tmp_path))
    monkeypatch.delenv("SWIN_MODEL_CACHE")
    common = ("train.max_steps=1", "model.img_size=96", "model.window_size=6", "tracking.register=false")
    fine = train(
        shards,
        tmp_path,
        "from_registry",
        uri,
        "init_from=models:/tracked@champion",
        *common,
        ranks=2,
        SWIN_MODEL_CACHE=str(tmp_path / "fresh-cache"),
    )  # 2 ranks pull it at once into one cache
    init = json.loads((tmp_path / "from_registry" / "init.json").read_text())
    assert init["init_head_rows_mapped"] == 10 and init["init_resized_bias_tables"] == 8, fine.stderr[-2000:]
    assert init["weights_sha256"] == champion.tags["weights_sha256"] != file_sha256(other / "model.safetensors")
    # the same command again resumes (init_from is not applied then), but an init_from that does not resolve is
    # still an error, naming the alias and the store
    again = train(
        shards, tmp_path, "from_registry", uri, "init_from=models:/tracked@nope", *common, ranks=2, check=False
    )
    assert again.returncode == 2 and "alias nope" in again.stderr and f"in the MLflow store {uri}" in again.stderr, (
        again.stderr[-3000:]
    )
    versions = [p for p in (tmp_path / "fresh-cache" / "tracked").iterdir() if not p.name.startswith(".")]
    assert len(versions) == 2 and all((v / "model.json").is_file() for v in versions), versions  # no partial leftovers

    # several processes of one node pull the same version at once: one downloads, the others wait and reuse it
    pulls = [
        subprocess.Popen(
            [sys.executable, "-c", PULL, "models:/tracked@champion"],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(uri, SWIN_MODEL_CACHE=str(tmp_path / "shared-cache")),
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in pulls]
    assert all(p.returncode == 0 for p in pulls), [err[-2000:] for _, err in outs]
    assert sum("downloaded models:/tracked@champion" in err for _, err in outs) == 1, [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # the same folder for all


PULL = """
import logging, sys
from pipeline.tracking.registry import pull_to_folder
logging.basicConfig(level=logging.INFO)
print(pull_to_folder(sys.argv[1]))
"""


def test_a_relative_local_store_and_its_artifacts_stay_where_the_user_launched(shards, tmp_path):
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db, out_dir=runs, a relative init_from and the recipe's own relative
    data.shards (runs/demo/shards), launched from a folder of the user's through the launch script (which changes
    to the repository): every relative path is that folder's. The store is there, the experiment the run creates
    keeps its artifacts in out_dir, the run reads the folder's shards and starts from its weights, and nothing
    lands in the checkout."""
    from swin_common.safe_weights import file_sha256

    here = tmp_path / "somewhere"
    (here / "runs" / "demo").mkdir(parents=True)
    (here / "runs" / "demo" / "shards").symlink_to(shards)
    weights = constant_export(here / "weights", [f"n{d:08d}" for d in range(10)], 4, 3.0)
    before = sorted(p.name for p in REPO.iterdir())
    proc = subprocess.run(
        [
            "bash",
            str(LAUNCH),
            "--config",
            str(TINY),
            "name=here",
            "out_dir=runs",
            "init_from=weights",
            "train.global_batch=32",
            "train.micro_batch=16",
            "eval.batch_size=50",
            "data.workers=0",
            "train.max_steps=2",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "tracking.system_metrics=false",
            "tracking.experiment=launched_here",
        ],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=900,
        env=env("sqlite:///mlflow.db", MASTER_PORT=str(free_port())),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (here / "mlflow.db").is_file() and (here / "runs" / "here" / "model").is_dir()
    client = MlflowClient(f"sqlite:///{here / 'mlflow.db'}")
    artifacts = (here / "runs" / "mlflow" / "artifacts").as_uri()
    experiment = client.get_experiment_by_name("launched_here")
    assert experiment.artifact_location == artifacts
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    version = client.get_model_version_by_alias("here", "candidate")
    assert version.source.startswith(artifacts) or client.get_run(version.run_id).info.artifact_uri.startswith(
        artifacts
    ), version.source
    assert sorted(p.name for p in REPO.iterdir()) == before  # no mlruns/, no mlflow.db in the checkout
    init = json.loads((here / "runs" / "here" / "init.json").read_text())
    assert init["weights_sha256"] == file_sha256(weights / "model.safetensors") and init["init_head_rows_mapped"] == 10
    config = (here / "runs" / "here" / "config.yaml").read_text()
    assert f"shards: {here / 'runs' / 'demo' / 'shards'}" in config and f"init_from: {weights}" in config, config


def test_training_survives_the_server_going_away(shards, tmp_path):
    """The server is stopped after the run's first metrics and restarted (same store, same port) a few steps
    later: training never stops, and every step's metrics reach the run once the server is back."""
    server = start_mlflow_server(tmp_path / "server")
    run_dir = tmp_path / "outage"
    args = [
        "--config",
        TINY,
        "name=outage",
        f"out_dir={tmp_path}",
        f"data.shards={shards}",
        "train.global_batch=16",
        "train.micro_batch=16",
        "data.workers=1",
        "train.log_every=1",
        "schedule.epochs=1",
        "train.max_steps=30",
        'data.val_split=""',
        "tracking.system_metrics=false",
    ]
    log_file = tmp_path / "train.log"  # a file, not a pipe: nobody reads a pipe until the end, and a full one blocks
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", *args],
            cwd=REPO,
            env=env(server.uri),
            stderr=log,
            stdout=log,
            text=True,
        )
    try:
        client = MlflowClient(server.uri)
        deadline = time.time() + 300
        while not (run_dir / "mlflow_run.json").is_file() or not client.get_metric_history(
            json.loads((run_dir / "mlflow_run.json").read_text())["run_id"], "loss"
        ):
            assert proc.poll() is None and time.time() < deadline, "the run ended or never logged"
            time.sleep(0.2)
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        # Training is paused while the server shuts down (a graceful stop can take longer than the 30 steps),
        # so the outage surely falls in the middle of the run.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            server.stop()
            logged_when_stopped = len((run_dir / "metrics.jsonl").read_text().splitlines())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert logged_when_stopped <= 25, f"{logged_when_stopped} steps done before the outage began"
        while len((run_dir / "metrics.jsonl").read_text().splitlines()) < logged_when_stopped + 5:
            assert proc.poll() is None, "training stopped while MLflow was down"
            assert time.time() < deadline, "training made no progress while MLflow was down"
            time.sleep(0.2)
        server = server.restart()
        proc.wait(timeout=600)
        err = log_file.read_text()
        assert proc.returncode == 0, err[-5000:]
        assert "MLflow unreachable" in err and "MLflow is reachable again" in err
        client = MlflowClient(server.uri)  # the restarted server, on the same store and port
        assert steps_of(client, run_id, "loss") == list(range(1, 31))
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_model_version_by_alias("outage", "candidate").run_id == run_id
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


@pytest.mark.s3
def test_artifacts_and_registry_on_s3(s3_server, shards, tmp_path):
    """A server whose artifacts live on the S3 server: the model version's files are there, and pull works."""
    bucket = s3_server.create_bucket("mlflow")
    server = start_mlflow_server(
        tmp_path / "s3mlflow",
        env={
            **s3_server.env,
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
        },
    )
    try:
        train(shards, tmp_path, "on_s3", server.uri, "train.max_steps=2", "tracking.system_metrics=false", ranks=1)
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.endswith("model/step_00000002/artifacts/model/model.safetensors") for k in keys), keys
        pulled = subprocess.run(
            [sys.executable, "-m", "pipeline.pull", "models:/on_s3@candidate", "--dst", str(tmp_path / "pulled")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=env(server.uri),
        )
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        assert (tmp_path / "pulled" / "model.safetensors").stat().st_size > 1_000_000

        # a big export (Swin-L's is ~790 MB) is registered whole, however short the end-of-run wait for metrics
        big = make_big_export(tmp_path / "on_s3" / "model", tmp_path / "big_model", 300_000_000)
        registered = register_at_the_end(tmp_path, "big", server.uri, big)
        keys = {o["Key"]: o["Size"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
        uploaded = [size for key, size in keys.items() if key.endswith("model.safetensors") and size > 300_000_000]
        assert registered.version == "1" and uploaded == [big.joinpath("model.safetensors").stat().st_size]
    finally:
        server.stop()


def make_big_export(real: Path, out: Path, size: int) -> Path:
    """An export folder whose weights file is `size` bytes (one big tensor), with the real one's model.json."""
    import torch
    from safetensors.torch import save_file

    out.mkdir()
    for name in ("model.json", "config.json"):
        (out / name).write_text((real / name).read_text())
    save_file({"w": torch.zeros(size // 4)}, str(out / "model.safetensors"))
    return out


def register_at_the_end(tmp_path: Path, name: str, uri: str, model: Path):
    """The train command's end-of-run steps on a run whose export is `model`, with a 1 s wait for queued
    records: registration runs in the foreground to its end."""
    from pipeline.config import dump_config, load_config
    from pipeline.engine.distributed import World
    from pipeline.tracking.store import store_at
    from pipeline.tracking.tracker import Tracker
    from pipeline.train import finish_tracking

    cfg = load_config(
        TINY, [f"name={name}", f"out_dir={tmp_path}", "tracking.final_timeout_s=1", "tracking.system_metrics=false"]
    )
    cfg.run_dir.mkdir(parents=True)
    dump_config(cfg, cfg.run_dir / "config.yaml")
    tracker = Tracker(cfg, World(0, 1, 0), store_at(uri, tmp_path), resumed=False)
    finish_tracking(cfg, tracker, model)
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    return client.get_model_version_by_alias(name, "candidate")


def test_a_refused_metrics_batch_drops_only_itself(mlflow_server):
    """The server answers 400 to a batch holding an invalid metric name: that batch is dropped, the records
    queued after it still arrive."""
    from mlflow.entities import Metric

    from pipeline.tracking.sender import Sender

    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment(f"refused-{time.time()}"))
    sender = Sender(client, run.info.run_id)
    now = int(time.time() * 1000)
    with sender.lock:  # nothing leaves before all 600 are queued: the first batch of 500 holds the bad one
        sender.metrics.append(Metric("bad<name>", 1.0, now, 0))
        sender.metrics += [Metric("loss", float(i), now, i) for i in range(1, 600)]
    assert sender.close(60)
    assert steps_of(client, run.info.run_id, "loss") == list(range(500, 600))


def test_a_crashed_run_is_failed_with_its_redacted_error(mlflow_server, tmp_path):
    """The train command's end for a crash (pipeline/train.py: tracker.failed): FAILED, and a tag with the
    error's first line, its credentials cut."""
    from pipeline.config import dump_config, load_config
    from pipeline.engine.distributed import World
    from pipeline.tracking.store import store_at
    from pipeline.tracking.tracker import Tracker

    cfg = load_config(TINY, ["name=crash", f"out_dir={tmp_path}", "tracking.system_metrics=false"])
    cfg.run_dir.mkdir(parents=True)
    dump_config(cfg, cfg.run_dir / "config.yaml")
    tracker = Tracker(cfg, World(0, 1, 0), store_at(mlflow_server.uri, tmp_path), resumed=False)
    tracker.failed(OSError("cannot read s3 shard via https://alice:hunter2secret@proxy.example:3128\nmore"))
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    tag = run.data.tags["swin.error"]
    assert tag.startswith("OSError: cannot read s3 shard via") and "hunter2secret" not in tag, tag
    assert "more" not in tag  # the first line only
