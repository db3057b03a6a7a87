"""A pulled model is the version it claims to be: two local MLflow stores each hold `twin` version 1 with other
weights, and one model cache serves both. Every consumer, run as a user runs it from a folder of their own (pull,
predict, evaluate, a fine-tuning run's init_from), gets its own store's weights and scores, after MLflow's own
tools (`mlflow models serve`, `mlflow.pyfunc.load_model`) have written their bookkeeping into the version's
folder; the same order on an MLflow server whose artifacts are on S3; a cached file changed on disk (each
consumer), and weights the store hands out under another's checksum, are errors naming the version and the
file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from runs import TINY, job_env
from servers import free_port, start_mlflow_server
from stores import constant_export, constant_scores, local_store, register_export

pytestmark = pytest.mark.slow
NAME = "twin"
SYNSETS = [f"n{d:08d}" for d in range(10)]
# store -> (the class it always predicts, its logit): other weights, other answers, other scores
MODELS = {"a": (3, 2.0), "b": (7, 6.0)}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two stores, `a` and `b`, each with models:/twin/1 (alias candidate) holding its own constant model."""
    root = tmp_path_factory.mktemp("twins")
    uris, exports = {}, {}
    for store, (label, logit) in MODELS.items():
        exports[store] = constant_export(root / f"export_{store}", SYNSETS, label, logit, seed=label)
        uris[store] = local_store(root / f"store_{store}")
        assert register_export(uris[store], NAME, exports[store]) == "1"
    return uris, exports


def run(cwd: Path, uri: str, cache: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = job_env(port=False, MLFLOW_TRACKING_URI=uri, SWIN_MODEL_CACHE=str(cache), SWIN_RANK_GRACE_S="2")
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def one_error(proc: subprocess.CompletedProcess, *says: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(s in errors[0] for s in says), errors[0]
    return errors[0]


def top1(proc: subprocess.CompletedProcess) -> tuple[str, float]:
    """(synset, probability) of the first image `python -m pipeline.predict` printed."""
    prob, synset = ok(proc).stdout.splitlines()[1].split()[:2]
    return synset, float(prob.rstrip("%"))


def expected_top1(store: str) -> tuple[str, float]:
    import math

    label, logit = MODELS[store]
    return SYNSETS[label], round(100 * math.exp(logit) / (math.exp(logit) + len(SYNSETS) - 1), 2)


def evaluate(cwd: Path, uri: str, cache: Path, model: str, shards: Path) -> subprocess.CompletedProcess:
    return run(
        cwd,
        uri,
        cache,
        "-m",
        "pipeline.evaluate",
        model,
        "--shards",
        shards,
        "--batch-size",
        50,
        "--workers",
        0,
        "--backend",
        "torch",
    )


def assert_scores(proc: subprocess.CompletedProcess, store: str) -> float:
    """The figures line of `python -m pipeline.evaluate` are those of `store`'s constant model; returns the loss."""
    line = next(line for line in ok(proc).stdout.splitlines() if line.startswith(f"models:/{NAME}/1 on "))
    assert "(split val, 100 samples)" in line, line
    want = constant_scores(*MODELS[store], [y for y in range(10) for _ in range(10)], len(SYNSETS))
    loss = float(line.split("loss ")[1].split(",")[0])
    assert loss == pytest.approx(want["loss"], abs=2e-4) and f"top-1 {want['top1']:.2f}%" in line, (store, line)
    return want["loss"]


def fine_tune(cwd: Path, uri: str, cache: Path, shards: Path, name: str, init_from: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.train` (one rank, one step, untracked) starting from `init_from`, in cwd/runs/NAME."""
    return run(
        cwd,
        uri,
        cache,
        "-m",
        "pipeline.train",
        "--config",
        TINY,
        f"name={name}",
        "out_dir=runs",
        f"data.shards={shards}",
        f"init_from={init_from}",
        "train.max_steps=1",
        "train.global_batch=16",
        "train.micro_batch=16",
        "data.workers=0",
        "data.val_split=",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "tracking.enabled=false",
    )


def sha256(path: Path) -> str:
    from swin_common.safe_weights import file_sha256

    return file_sha256(path)


def version_folder(uri: str) -> Path:
    """The local store's artifact folder of models:/twin/1 (where MLflow's tools write their bookkeeping)."""
    source = MlflowClient(uri).get_model_version(NAME, "1").source
    return Path(source.removeprefix("file://"))


LOAD_MODEL = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}))
print(json.dumps({"label": out["label"][0], "probability": out["probability"][0]}))
"""


def serve_once(cwd: Path, uri: str, image: Path) -> str:
    """`mlflow models serve -m models:/twin@candidate` on the local store, one request: the label it answers."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{mlflow_cli.parent}:{os.environ['PATH']}"}
    with open(cwd / "serve.log", "w") as log:
        server = subprocess.Popen(
            [
                str(mlflow_cli),
                "models",
                "serve",
                "-m",
                f"models:/{NAME}@candidate",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        deadline = time.time() + 240
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        )
        while True:
            assert server.poll() is None, (cwd / "serve.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read())["predictions"][0]["label"]
            except OSError:
                assert time.time() < deadline, (cwd / "serve.log").read_text()[-3000:]
                time.sleep(1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def image(digits_tars, tmp_path_factory) -> Path:
    with tarfile.open(digits_tars / "n00000005.tar") as tar:
        member = next(m for m in tar.getmembers() if m.isfile())
        path = tmp_path_factory.mktemp("image") / "digit5.jpg"
        path.write_bytes(tar.extractfile(member).read())
    return path


def test_one_cache_serves_two_stores_each_its_own_weights(twins, image, shards, tmp_path):
    uris, exports = twins
    user = tmp_path / "user"  # the user's folder, outside the checkout
    user.mkdir()
    cache = tmp_path / "cache"

    # MLflow's own tools first, on store a: they write `registered_model_meta` into the version's folder
    served = serve_once(user, uris["a"], image)
    loaded = json.loads(
        ok(run(user, uris["a"], cache, "-c", LOAD_MODEL, f"models:/{NAME}@candidate", image)).stdout.splitlines()[-1]
    )
    assert served == loaded["label"] == expected_top1("a")[0]
    assert (version_folder(uris["a"]) / "registered_model_meta").is_file()  # the trap is live

    # pull: a folder per store, each holding its own store's weights (and nothing of MLflow's bookkeeping)
    folders = {}
    for store in ("a", "b"):
        out = ok(run(user, uris[store], cache, "-m", "pipeline.pull", f"models:/{NAME}@candidate")).stdout
        folders[store] = Path(out.splitlines()[-1])
        assert sha256(folders[store] / "model.safetensors") == sha256(exports[store] / "model.safetensors")
        assert sorted(p.name for p in folders[store].iterdir()) == ["config.json", "model.json", "model.safetensors"]
    assert folders["a"] != folders["b"] and folders["a"].parent == folders["b"].parent == cache / NAME

    # predict and evaluate, in turn through the one cache: each store's model answers and scores as its own
    for store in ("a", "b"):
        assert top1(
            run(user, uris[store], cache, "-m", "pipeline.predict", f"models:/{NAME}@candidate", "-k", "1", image)
        ) == expected_top1(store), store
    for store in ("b", "a"):
        want_loss = assert_scores(evaluate(user, uris[store], cache, f"models:/{NAME}@candidate", shards), store)
        tags = MlflowClient(uris[store]).get_model_version(NAME, "1").tags
        recorded = [float(v) for k, v in tags.items() if k.endswith(".val.loss")]
        assert recorded == [pytest.approx(want_loss, abs=2e-4)], (store, tags)  # on its own store's version

    # a fine-tuning run from the user's folder starts from store a's weights, store b's twin/1 in the same cache
    ok(fine_tune(user, uris["a"], cache, shards, "from_a", f"models:/{NAME}@candidate"))
    init = json.loads((user / "runs" / "from_a" / "init.json").read_text())
    assert (
        init["weights_sha256"]
        == sha256(exports["a"] / "model.safetensors")
        != sha256(exports["b"] / "model.safetensors")
    )
    assert Path(init["source"].split()[-1]) == folders["a"]

    # a cached file changed on disk: refused by every consumer, naming the version and the file
    weights = folders["a"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a tensor: the header still parses
    weights.write_bytes(bytes(data))
    for proc in (
        run(user, uris["a"], cache, "-m", "pipeline.pull", f"models:/{NAME}/1"),
        run(user, uris["a"], cache, "-m", "pipeline.predict", f"models:/{NAME}/1", image),
        evaluate(user, uris["a"], cache, f"models:/{NAME}/1", shards),
        fine_tune(user, uris["a"], cache, shards, "from_changed", f"models:/{NAME}/1"),
    ):
        one_error(proc, f"models:/{NAME}/1", str(weights), "was changed after it was pulled")
    assert not (user / "runs" / "from_changed").exists()

    # the store made again (`--fresh`): the same store, and its new twin/1 is another model (another run)
    client = MlflowClient(uris["a"])
    client.delete_registered_model(NAME)
    assert register_export(uris["a"], NAME, exports["b"]) == "1"
    folder = Path(ok(run(user, uris["a"], cache, "-m", "pipeline.pull", f"models:/{NAME}/1")).stdout.split()[-1])
    assert folder not in folders.values() and folder.parent == cache / NAME
    assert sha256(folder / "model.safetensors") == sha256(exports["b"] / "model.safetensors")


def test_a_version_without_a_recorded_checksum_gets_one_and_store_swapped_weights_fail(twins, image, tmp_path):
    """A version registered before checksums: its first pull records it (said once); weights the store hands
    out that are not the registered ones fail the pull and MLflow's own loader alike, naming the file."""
    uris, exports = twins
    client = MlflowClient(uris["b"])
    client.delete_model_version_tag(NAME, "1", "weights_sha256")
    cache = tmp_path / "cache"
    first = ok(run(tmp_path, uris["b"], cache, "-m", "pipeline.pull", f"models:/{NAME}/1"))
    assert first.stderr.count("was registered without a weights checksum") == 1, first.stderr[-2000:]
    assert client.get_model_version(NAME, "1").tags["weights_sha256"] == sha256(exports["b"] / "model.safetensors")
    again = ok(run(tmp_path, uris["b"], tmp_path / "other-cache", "-m", "pipeline.pull", f"models:/{NAME}/1"))
    assert "without a weights checksum" not in again.stderr

    # the store's own copy replaced by other weights after registration
    stored = version_folder(uris["b"]) / "artifacts" / "model" / "model.safetensors"
    shutil.copyfile(exports["a"] / "model.safetensors", stored)
    one_error(
        run(tmp_path, uris["b"], tmp_path / "new-cache", "-m", "pipeline.pull", f"models:/{NAME}/1"),
        f"models:/{NAME}/1",
        "model.safetensors has sha256",
        "handed out other weights",
    )
    assert not [p for p in (tmp_path / "new-cache" / NAME).iterdir() if not p.name.startswith(".")]  # nothing kept
    loaded = run(tmp_path, uris["b"], cache, "-c", LOAD_MODEL, f"models:/{NAME}/1", image)
    assert (
        loaded.returncode != 0
        and f"models:/{NAME}/1: " in loaded.stderr
        and "model.safetensors has sha256" in loaded.stderr
        and "the version recorded" in loaded.stderr
    ), loaded.stderr[-3000:]


@pytest.mark.s3
def test_mlflow_tools_then_every_consumer_on_the_s3_backed_server(s3_server, image, shards, tmp_path):
    """On an MLflow server whose artifacts are on S3: `mlflow models serve` and `mlflow.pyfunc.load_model` first,
    then pull, predict, evaluate and a fine-tuning run's init_from, from the user's folder through one cache: each
    answers with the version's own weights."""
    from pipeline.tracking.registry import register

    bucket = s3_server.create_bucket("twins")
    server = start_mlflow_server(
        tmp_path / "mlflow",
        env={
            **s3_server.env,
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
        },
    )
    try:
        uri, user, cache = server.uri, tmp_path / "user", tmp_path / "cache"
        user.mkdir()
        export = constant_export(tmp_path / "export", SYNSETS, *MODELS["a"], seed=MODELS["a"][0])
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("registered")).info.run_id
        assert register(client, run_id, export, NAME, ["candidate"]) == "1"
        client.set_terminated(run_id)
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.endswith("artifacts/model/model.safetensors") for k in keys), keys  # on S3

        assert serve_once(user, uri, image) == expected_top1("a")[0]
        loaded = run(user, uri, cache, "-c", LOAD_MODEL, f"models:/{NAME}@candidate", image)
        assert json.loads(ok(loaded).stdout.splitlines()[-1])["label"] == expected_top1("a")[0]

        pulled = ok(run(user, uri, cache, "-m", "pipeline.pull", f"models:/{NAME}@candidate")).stdout
        folder = Path(pulled.splitlines()[-1])
        assert folder.parent == cache / NAME
        assert sha256(folder / "model.safetensors") == sha256(export / "model.safetensors")
        predicted = run(user, uri, cache, "-m", "pipeline.predict", f"models:/{NAME}@candidate", "-k", "1", image)
        assert top1(predicted) == expected_top1("a")
        assert_scores(evaluate(user, uri, cache, f"models:/{NAME}@candidate", shards), "a")
        ok(fine_tune(user, uri, cache, shards, "from_s3", f"models:/{NAME}@candidate"))
        init = json.loads((user / "runs" / "from_s3" / "init.json").read_text())
        assert init["weights_sha256"] == sha256(export / "model.safetensors")
    finally:
        server.stop()


def on_a_terminal(cwd: Path, uri: str, cache: Path, *args, timeout: float = 120) -> tuple[int, str]:
    """`python ARGS` with a terminal (a pty) as its stdin, stdout and stderr: its exit status and all it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0 columns: bars print nothing
    env = job_env(port=False, MLFLOW_TRACKING_URI=uri, SWIN_MODEL_CACHE=str(cache))
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=cwd, stdin=terminal, stdout=terminal, stderr=terminal, env=env
    )
    os.close(terminal)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every end of the terminal's other side is closed
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_a_pull_on_a_terminal_shows_one_progress_bar(twins, tmp_path):
    """On a terminal a pull shows its own bar, one for the download, not MLflow's bar per file."""
    uris, _exports = twins
    # store a: the earlier test left store b handing out other weights than it registered
    code, out = on_a_terminal(tmp_path, uris["a"], tmp_path / "cache", "-m", "pipeline.pull", f"models:/{NAME}/1")
    assert code == 0, out[-3000:]
    assert f"pulling models:/{NAME}/1" in out and "Downloading artifacts" not in out, out[-3000:]
