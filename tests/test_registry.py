"""A registered version works with the tools its users already have, on a real MLflow server whose artifacts are
on the S3 server: MLflow's `pyfunc.load_model` in a fresh process that cannot import this project, `mlflow models
serve` answering a real HTTP client, timm's `local-dir:` loader and eval transform; and this project's pull takes
only the export from a version, refusing crafted ones file by file before anything is downloaded."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from runs import TINY, job_env
from servers import REPO, free_port, run_prep, start_mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.s3]
PROJECT = ("pipeline", "data_prep", "swin_common")

# a fresh interpreter in which this project cannot be imported (the venv has it installed, editable)
NO_PROJECT = f"""
import sys
class NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT!r}:
            raise ImportError(f"{{name}}: this project is not importable here")
sys.meta_path.insert(0, NoProject())
"""


@pytest.fixture(scope="module")
def registry(s3_server, tmp_path_factory):
    """An MLflow server (sqlite store) whose artifacts are proxied to the S3 server."""
    bucket = s3_server.create_bucket("registry")
    server = start_mlflow_server(
        tmp_path_factory.mktemp("registry") / "mlflow",
        env={
            **s3_server.env,
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
        },
    )
    try:
        yield SimpleNamespace(uri=server.uri, s3=s3_server, bucket=bucket)
    finally:
        server.stop()


def env(uri: str, **extra) -> dict[str, str]:
    return job_env(port=False, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", **extra)


@pytest.fixture(scope="module")
def trained(registry, digits_tars, tmp_path_factory):
    """A tiny model trained on the digits for 3 epochs (162 steps, one rank: ~70% val top-1, 16 of the 20 images
    below; more epochs add nothing here) and registered as models:/tiny@candidate
    by the train command itself: the one trained model of this module's tests."""
    tmp = tmp_path_factory.mktemp("trained")
    shards = tmp / "shards"
    run_prep("shard", "--source", digits_tars, "--out", shards, "--max-samples", 200, "--holdout-per-class", 4)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--config",
            TINY,
            "name=tiny",
            f"out_dir={tmp}",
            f"data.shards={shards}",
            "train.global_batch=32",
            "train.micro_batch=32",
            "eval.batch_size=40",
            "data.workers=0",
            "schedule.epochs=3",
            "schedule.warmup_epochs=0",
            "train.log_every=10",
            "tracking.system_metrics=false",
            "tracking.aliases=[candidate]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env(registry.uri, MASTER_PORT=str(free_port())),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "registered tiny version 1" in proc.stderr, proc.stderr[-5000:]
    return tmp / "tiny"


@pytest.fixture(scope="module")
def images(digits_tars, tmp_path_factory) -> list[Path]:
    """Two held-out-looking digits per class, as JPEG files."""
    out = tmp_path_factory.mktemp("images")
    paths = []
    for digit in range(10):
        with tarfile.open(digits_tars / f"n{digit:08d}.tar") as tar:
            members = [m for m in tar.getmembers() if m.isfile()][-2:]
            for i, member in enumerate(members):
                paths.append(out / f"digit{digit}_{i}.jpg")
                paths[-1].write_bytes(tar.extractfile(member).read())
    return paths


def predict_top1(model: str, images: list[Path], uri: str, **extra) -> list[str]:
    """The top-1 synset per image as `python -m pipeline.predict` prints it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", model, *map(str, images)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(uri, **extra),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return [lines[i + 1].split()[1] for i, line in enumerate(lines) if not line.startswith(" ")]


def version_files(client, name: str, version: str) -> list[str]:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from pipeline.tracking.registry import list_files

    source = client.get_model_version_download_uri(name, version)
    return list_files(get_artifact_repository(source, tracking_uri=client.tracking_uri))


PYFUNC = (
    NO_PROJECT
    + """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"image": [open(p, "rb").read() for p in sys.argv[2:]]})
out = model.predict(frame, params={"top_k": 3})
print(json.dumps({"labels": list(out["label"]), "top": [list(t) for t in out["top_labels"]],
                  "probs": [list(p) for p in out["top_probabilities"]],
                  "inputs": str(model.metadata.get_input_schema()), "params": str(model.metadata.get_params_schema())}))
"""
)


def test_a_version_is_an_mlflow_model_that_loads_without_this_project(registry, trained, images, tmp_path):
    client = MlflowClient(registry.uri)
    version = client.get_model_version_by_alias("tiny", "candidate")
    files = version_files(client, "tiny", version.version)
    assert sorted(files) == [
        "MLmodel",
        "artifacts/model/config.json",
        "artifacts/model/model.json",
        "artifacts/model/model.safetensors",
        "conda.yaml",
        "input_example.json",
        "python_env.yaml",
        "requirements.txt",
        "serving_input_example.json",
        "swin_pyfunc.py",
    ]
    keys = [o["Key"] for o in registry_objects(registry)]
    assert any(k.endswith("artifacts/model/model.safetensors") for k in keys), keys  # on S3

    import mlflow

    root = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri("tiny", version.version),
            dst_path=str(tmp_path),
            tracking_uri=registry.uri,
        )
    )
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"] == "swin_pyfunc.py" and pyfunc["artifacts"] == {
        "model": {"path": "artifacts/model"}
    }
    assert (root / "swin_pyfunc.py").read_text() == (REPO / "pipeline" / "tracking" / "swin_pyfunc.py").read_text()
    # no path of the training host (the repository, a temporary folder, the run folder, home) in any text file
    for path in [root / "MLmodel", *root.glob("*.yaml"), *root.glob("*.txt"), *root.glob("*.json")]:
        text = path.read_text()
        for host_path in (str(REPO), "/tmp/", str(trained), str(Path.home())):
            assert host_path not in text, f"{path.name} names {host_path}"
    requirements = (root / "requirements.txt").read_text().split()
    assert requirements == [
        f"{p}=={metadata.version(p).split('+')[0]}"
        for p in ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas")
    ]
    # the code file imports only what a serving host has
    imports = {
        line.split()[1].split(".")[0]
        for line in (root / "swin_pyfunc.py").read_text().splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imports <= {
        "__future__",
        "base64",
        "binascii",
        "hashlib",
        "io",
        "os",
        "re",
        "warnings",
        "mlflow",
        "pandas",
        "timm",
        "torch",
        "PIL",
    }, imports

    # MLflow's own loader, fresh process, pickles refused, this project not importable: the same top-1 as predict
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC, "models:/tiny@candidate", *map(str, images)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(registry.uri),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "'image': binary" in out["inputs"] and "'top_k': long (default: 5)" in out["params"], out
    ours = predict_top1("models:/tiny@candidate", images, registry.uri, SWIN_MODEL_CACHE=str(tmp_path / "cache"))
    assert out["labels"] == ours, (out["labels"], ours)
    assert (
        sum(label == f"n{int(p.name[5]):08d}" for label, p in zip(ours, images, strict=True)) >= 12
    )  # it learned the digits
    assert all(len(t) == 3 and t[0] == label for t, label in zip(out["top"], out["labels"], strict=True))
    assert all(p[0] >= p[1] >= p[2] for p in out["probs"])


def registry_objects(registry) -> list[dict]:
    return registry.s3.client().list_objects_v2(Bucket=registry.bucket).get("Contents", [])


class RunsCode:
    """Unpickling this creates the folder `path`: the proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def craft(client, run_id: str, name: str, folder: Path) -> str:
    """`folder` registered as it is (no check of this project's on the way in): models:/NAME/1."""
    client.log_artifacts(run_id, str(folder), f"crafted/{name}")
    client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/crafted/{name}"
    return f"models:/{name}/{client.create_model_version(name, source, run_id=run_id).version}"


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "deepspeed"):
            raise ImportError(f"{name}: pull must not need it")
sys.meta_path.insert(0, NoTorch())
from pipeline.pull import main
sys.exit(main(sys.argv[1:]))
"""


def test_pull_needs_neither_torch_nor_timm(registry, trained, tmp_path):
    """`python -m pipeline.pull` answers in about the time MLflow's client takes to import: it reads the
    export's json and the safetensors header, and never imports torch, timm or DeepSpeed."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "models:/tiny@candidate", "--dst", str(tmp_path / "p")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(registry.uri),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, folder = proc.stdout.splitlines()
    assert (
        first.startswith("models:/tiny@candidate: swin_nano_patch4_window4_64, 10 classes, ")
        and "M parameters" in first
    ), first
    assert Path(folder) == tmp_path / "p" and (tmp_path / "p" / "config.json").is_file()


def test_the_pull_takes_only_the_export_and_refuses_crafted_versions(registry, trained, images, tmp_path):
    """Versions made by hand on the server (artifacts on S3): one file outside the allow-list makes the pull
    fail naming it, before anything is downloaded, and nothing from it is imported, run or unpickled; a version
    registered before the MLflow model layout (the export itself) still pulls and predicts."""
    import shutil

    import torch

    from pipeline.engine.model_export import UnsafeModelFile
    from pipeline.tracking import mlflow_model
    from pipeline.tracking.mlflow_model import UnexpectedVersionFile
    from pipeline.tracking.registry import pull_to_folder
    from pipeline.tracking.store import store_at

    client = MlflowClient(registry.uri)
    run_id = client.create_run(client.create_experiment("crafted")).info.run_id
    good = mlflow_model.build(trained / "model", tmp_path / "good")
    marker = tmp_path / "code-ran"
    pickle = io.BytesIO()
    torch.save({"w": RunsCode(marker)}, pickle)
    code = f"import os\nos.mkdir({str(marker)!r})\n"

    def variant(label: str, edit) -> Path:
        folder = tmp_path / label
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def write(relative: str, data: bytes | str):
        def edit(folder: Path):
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(data.encode() if isinstance(data, str) else data)

        return edit

    refused = {
        "pkl": (write("model.pkl", pickle.getvalue()), "model.pkl"),
        "pt": (write("weights.pt", pickle.getvalue()), "weights.pt"),
        "bin": (write("artifacts/model/pytorch_model.bin", pickle.getvalue()), "artifacts/model/pytorch_model.bin"),
        "codedir": (write("code/helpers.py", code), "code/helpers.py"),
        "second": (write("loader.py", code), "loader.py"),
        "beside": (write("artifacts/other/model.safetensors", b"x"), "artifacts/other/model.safetensors"),
    }
    cache = tmp_path / "cache"
    os.environ["SWIN_MODEL_CACHE"] = str(cache)
    try:
        for label, (edit, named) in refused.items():
            uri = craft(client, run_id, f"crafted_{label}", variant(label, edit))
            with pytest.raises(UnexpectedVersionFile, match=rf"{uri} holds {named}: refused") as e:
                pull_to_folder(uri, store=store_at(registry.uri, tmp_path))
            assert "nothing was downloaded" in str(e.value)
            kept = [p.name for p in (cache / f"crafted_{label}").iterdir()]
            assert len(kept) == 1 and kept[0].startswith(".1-") and kept[0].endswith(".lock"), (label, kept)
        # a pickle named model.safetensors inside the export: the export's own check, after a download
        uri = craft(
            client,
            run_id,
            "crafted_named",
            variant("named", write("artifacts/model/model.safetensors", pickle.getvalue())),
        )
        with pytest.raises(UnsafeModelFile, match="is not a safetensors file"):
            pull_to_folder(uri, store=store_at(registry.uri, tmp_path))
        kept = [p.name for p in (cache / "crafted_named").iterdir()]
        assert len(kept) == 1 and kept[0].startswith(".1-") and kept[0].endswith(".lock"), kept  # nothing kept

        # the good one: only the export comes down
        uri = craft(client, run_id, "crafted_good", good)
        folder = pull_to_folder(uri, store=store_at(registry.uri, tmp_path))
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.json", "model.safetensors"]
    finally:
        del os.environ["SWIN_MODEL_CACHE"]
    assert not marker.exists()

    # a version registered before this layout: the export folder itself
    old = craft(client, run_id, "old_layout", variant("old", lambda f: None) / "artifacts" / "model")
    assert predict_top1(old, images, registry.uri, SWIN_MODEL_CACHE=str(tmp_path / "old-cache")) == predict_top1(
        str(trained / "model"), images, registry.uri
    )


TIMM = (
    NO_PROJECT
    + """
import json, sys
import timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**config)
batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in sys.argv[2:]])
with torch.no_grad():
    top1 = model(batch).argmax(dim=1).tolist()
labels = model.pretrained_cfg["label_names"]
print(json.dumps({"labels": [labels[i] for i in top1], "config": {k: v for k, v in config.items()}}))
"""
)


@pytest.mark.parametrize("size,window", [(224, 7), (384, 12)])
def test_plain_timm_loads_a_pulled_version(registry, images, tmp_path, size, window):
    """timm's own loader and eval transform, without this project, on a pulled folder: the same top-1 as
    `python -m pipeline.predict`."""
    import torch
    from safetensors.torch import save_file

    from pipeline.config import RunConfig
    from pipeline.engine.model_export import model_metadata, write_timm_config
    from pipeline.model import create_model
    from pipeline.tracking.registry import pull_to_folder, register
    from pipeline.tracking.store import store_at

    torch.manual_seed(size)
    synsets = [f"n{d:08d}" for d in range(10)]
    cfg = RunConfig()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size = "swin_nano", size, window
    model = create_model("swin_nano", size, window, len(synsets))
    export = tmp_path / "export"
    export.mkdir()
    save_file(model.state_dict(), str(export / "model.safetensors"))
    meta = model_metadata(cfg, synsets)
    (export / "model.json").write_text(json.dumps(meta))
    write_timm_config(model, export, meta)

    client = MlflowClient(registry.uri)
    run_id = client.create_run(client.create_experiment(f"timm_{size}")).info.run_id
    name = f"timm_{size}"
    register(client, run_id, export, name, ["candidate"])
    folder = pull_to_folder(f"models:/{name}@candidate", tmp_path / "pulled", store=store_at(registry.uri, tmp_path))

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "swin_tiny_patch4_window7_224" and config["num_classes"] == 10
    assert config["label_names"] == synsets
    assert {k: config["model_args"][k] for k in ("img_size", "window_size", "embed_dim", "depths", "num_heads")} == {
        "img_size": [size, size],
        "window_size": window,
        "embed_dim": 32,
        "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 4, 8],
    }
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, size, size] and pre["crop_pct"] == cfg.data.crop_pct
    assert pre["interpolation"] == "bicubic" and pre["mean"] == list(meta["preprocessing"]["mean"])
    assert pre["std"] == list(meta["preprocessing"]["std"])
    inherited = {"tag", "license", "url", "hf_hub_id", "description", "paper_ids", "origin_url"}
    assert not inherited & (set(pre) | set(config)), sorted(inherited & (set(pre) | set(config)))
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pth"))  # never timm's pickle default

    proc = subprocess.run(
        [sys.executable, "-c", TIMM, str(folder), *map(str, images)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(registry.uri),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["config"]["input_size"] == [3, size, size] and out["config"]["crop_pct"] == cfg.data.crop_pct
    assert out["labels"] == predict_top1(str(folder), images, registry.uri)


def post(port: int, payload, timeout: float = 120) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_mlflow_serves_a_version(registry, trained, images, tmp_path):
    """`mlflow models serve -m models:/tiny@candidate --env-manager local` answers a real HTTP client: the
    labels pipeline.predict gives in the three JSON request formats, a 400 naming the problem for bad inputs
    (the server serving on after each), and 8 concurrent requests."""
    port = free_port()
    log = tmp_path / "serve.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                str(mlflow_cli),
                "models",
                "serve",
                "-m",
                "models:/tiny@candidate",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env(registry.uri, PATH=f"{mlflow_cli.parent}:{os.environ['PATH']}"),
        )
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        encoded = [b64(p.read_bytes()) for p in images]
        expected = predict_top1(
            "models:/tiny@candidate", images, registry.uri, SWIN_MODEL_CACHE=str(tmp_path / "cache")
        )
        requests = {
            "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
            "dataframe_records": {"dataframe_records": [{"image": e} for e in encoded]},
            "inputs": {"inputs": {"image": encoded}, "params": {"top_k": 2}},
        }
        for form, payload in requests.items():
            status, answer = post(port, payload)
            assert status == 200, (form, answer)
            rows = answer["predictions"]
            assert [r["label"] for r in rows] == expected, form
            assert all(len(r["top_labels"]) == (2 if form == "inputs" else 5) for r in rows), form

        jpeg = images[0].read_bytes()
        bomb = io.BytesIO()
        Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 MP that compress to a few kB
        bad = {
            "not an image": ([b64(b"hello, this is text, not a picture")], "not an image"),
            "truncated": ([b64(jpeg[: len(jpeg) // 2])], "truncated"),
            "bomb": ([b64(bomb.getvalue())], "too many pixels"),
            "empty": ([], "no image"),
        }
        for case, (data, says) in bad.items():
            status, answer = post(port, {"dataframe_split": {"columns": ["image"], "data": [[d] for d in data]}})
            assert 400 <= status < 500 and says in answer.get("message", ""), (case, status, answer)
            status, answer = post(port, {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]]]}})
            assert status == 200 and answer["predictions"][0]["label"] == expected[0], (case, answer)

        one = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded[:4]]}}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(port, one, timeout=300), range(8)))
        assert [status for status, _ in answers] == [200] * 8
        assert all([r["label"] for r in a["predictions"]] == expected[:4] for _, a in answers)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
