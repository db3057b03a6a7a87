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

from runs import TINY, job_env, run_summary
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
def trained(registry, digits_tars, tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained on the digits for 3 epochs (162 steps, one rank: ~70% val top-1, 16 of the 20 images
    below; more epochs add nothing here) and registered as models:/tiny@candidate by the train command itself:
    the one trained model of this module's tests. Its run folder and the summary the command printed."""
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
    return SimpleNamespace(run_dir=tmp / "tiny", summary=run_summary(proc.stdout))


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


@pytest.fixture(scope="module")
def predicted(registry, trained, images, tmp_path_factory) -> list[str]:
    """The top-1 synsets of `python -m pipeline.predict models:/tiny@candidate` for the images: what every other
    loader of the version must answer."""
    cache = tmp_path_factory.mktemp("predict-cache")
    return predict_top1("models:/tiny@candidate", images, registry.uri, SWIN_MODEL_CACHE=str(cache))


@pytest.fixture(scope="module")
def version(registry, trained, tmp_path_factory) -> SimpleNamespace:
    """The registered version as MLflow stores it: its training run, its files on the server, and a downloaded
    copy (`root`)."""
    import mlflow

    client = MlflowClient(registry.uri)
    found = client.get_model_version_by_alias("tiny", "candidate")
    source = client.get_model_version_download_uri("tiny", found.version)
    root = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp_path_factory.mktemp("version")), tracking_uri=registry.uri
    )
    return SimpleNamespace(run_id=found.run_id, files=version_files(client, "tiny", found.version), root=Path(root))


@pytest.fixture(scope="module")
def pyfunc(registry, trained, images, tmp_path_factory) -> dict:
    """What MLflow's own loader answers in a fresh process where pickles are refused and this project cannot be
    imported: labels, top 3 labels and probabilities, and the model's input and params schemas."""
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC, "models:/tiny@candidate", *map(str, images)],
        cwd=tmp_path_factory.mktemp("pyfunc"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env(registry.uri),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_training_run_registered_its_model(trained):
    assert (trained.summary["registered"], trained.summary["aliases"]) == ("models:/tiny/1", ["candidate"])


def test_a_version_holds_an_mlflow_model_of_the_export(version):
    assert sorted(version.files) == [
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


def test_a_version_is_stored_on_s3(registry, version):
    keys = [o["Key"] for o in registry_objects(registry) if version.run_id in o["Key"]]
    assert any(k.endswith("artifacts/model/model.safetensors") for k in keys), keys


def test_a_version_loads_through_the_project_code_file(version):
    pyfunc = yaml.safe_load((version.root / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["model_code_path"] == "swin_pyfunc.py" and pyfunc["artifacts"] == {
        "model": {"path": "artifacts/model"}
    }
    code = REPO / "pipeline" / "tracking" / "swin_pyfunc.py"
    assert (version.root / "swin_pyfunc.py").read_text() == code.read_text()


def test_a_version_names_no_path_of_the_training_host(version, trained):
    """No path of the repository, a temporary folder, the run folder or home in any of its text files."""
    root = version.root
    for path in [root / "MLmodel", *root.glob("*.yaml"), *root.glob("*.txt"), *root.glob("*.json")]:
        text = path.read_text()
        for host_path in (str(REPO), "/tmp/", str(trained.run_dir), str(Path.home())):
            assert host_path not in text, f"{path.name} names {host_path}"


def test_a_version_pins_what_it_was_trained_with(version):
    requirements = (version.root / "requirements.txt").read_text().split()
    assert requirements == [
        f"{p}=={metadata.version(p).split('+')[0]}"
        for p in ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas")
    ]


def test_the_code_file_imports_only_what_a_serving_host_has(version):
    imports = {
        line.split()[1].split(".")[0]
        for line in (version.root / "swin_pyfunc.py").read_text().splitlines()
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


def test_mlflow_loads_a_version_without_this_project_and_predicts_the_same(pyfunc, predicted):
    assert pyfunc["labels"] == predicted, (pyfunc["labels"], predicted)


def test_the_loaded_model_takes_images_and_a_top_k(pyfunc):
    assert "'image': binary" in pyfunc["inputs"] and "'top_k': long (default: 5)" in pyfunc["params"], pyfunc
    assert all(len(t) == 3 and t[0] == label for t, label in zip(pyfunc["top"], pyfunc["labels"], strict=True))
    assert all(p[0] >= p[1] >= p[2] for p in pyfunc["probs"])


def test_the_version_learned_the_digits(predicted, images):
    assert sum(label == f"n{int(p.name[5]):08d}" for label, p in zip(predicted, images, strict=True)) >= 12


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
    export's json and the safetensors header, and never imports torch, timm or DeepSpeed; it prints what it
    pulled, then the folder."""
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
    assert first.startswith("models:/tiny@candidate: ") and Path(folder) == tmp_path / "p", proc.stdout
    meta = json.loads((tmp_path / "p" / "model.json").read_text())
    assert (meta["timm_name"], meta["num_classes"]) == ("swin_nano_patch4_window4_64", 10), meta
    assert (tmp_path / "p" / "config.json").is_file()


# Versions made by hand on the server, by label: the file each adds to a good version, and what it holds
REFUSED = {
    "pkl": ("model.pkl", "pickle"),
    "pt": ("weights.pt", "pickle"),
    "bin": ("artifacts/model/pytorch_model.bin", "pickle"),
    "codedir": ("code/helpers.py", "code"),
    "second": ("loader.py", "code"),
    "beside": ("artifacts/other/model.safetensors", "bytes"),
}


@pytest.fixture(scope="module")
def crafted(registry, trained, tmp_path_factory) -> SimpleNamespace:
    """Versions made by hand on the server (artifacts on S3), each pulled once by this project: one per REFUSED
    file added to a good version, one whose model.safetensors is a pickle, the good one, and one registered
    before the MLflow model layout (the export folder itself). What each pull raised or gave, what the model
    cache kept of each, and whether any code of theirs ran (the marker folder)."""
    import shutil

    import torch

    from pipeline.engine.model_export import UnsafeModelFile
    from pipeline.tracking import mlflow_model
    from pipeline.tracking.mlflow_model import UnexpectedVersionFile
    from pipeline.tracking.registry import pull_to_folder
    from pipeline.tracking.store import store_at

    tmp_path = tmp_path_factory.mktemp("crafted")
    client = MlflowClient(registry.uri)
    run_id = client.create_run(client.create_experiment("crafted")).info.run_id
    good = mlflow_model.build(trained.run_dir / "model", tmp_path / "good")
    marker = tmp_path / "code-ran"
    pickle = io.BytesIO()
    torch.save({"w": RunsCode(marker)}, pickle)
    content = {"pickle": pickle.getvalue(), "code": f"import os\nos.mkdir({str(marker)!r})\n".encode(), "bytes": b"x"}

    def variant(label: str, relative: str | None = None, data: bytes = b"") -> Path:
        folder = tmp_path / label
        shutil.copytree(good, folder)
        if relative is not None:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(data)
        return folder

    folders = {label: variant(label, relative, content[kind]) for label, (relative, kind) in REFUSED.items()}
    folders["named"] = variant("named", "artifacts/model/model.safetensors", content["pickle"])
    folders["good"] = good
    out = SimpleNamespace(uris={}, pulled={}, raised={}, kept={}, cache=tmp_path / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWIN_MODEL_CACHE", str(out.cache))
        for label, folder in folders.items():
            out.uris[label] = uri = craft(client, run_id, f"crafted_{label}", folder)
            try:
                out.pulled[label] = pull_to_folder(uri, store=store_at(registry.uri, tmp_path))
            except (UnexpectedVersionFile, UnsafeModelFile) as e:  # which, and naming what, the tests say
                out.raised[label] = e
            out.kept[label] = sorted(p.name for p in (out.cache / f"crafted_{label}").iterdir())
    out.code_ran = marker.exists()
    out.old_layout = craft(client, run_id, "old_layout", variant("old") / "artifacts" / "model")
    return out


@pytest.mark.parametrize("label", REFUSED)
def test_a_file_outside_the_allow_list_is_refused_naming_it_before_any_download(crafted, label):
    from pipeline.tracking.mlflow_model import UnexpectedVersionFile

    error, named = crafted.raised.get(label), REFUSED[label][0]
    assert isinstance(error, UnexpectedVersionFile), error
    assert f"{crafted.uris[label]} holds {named}: refused" in str(error)  # the message a user reads names the file
    assert "nothing was downloaded" in str(error)
    kept = crafted.kept[label]  # the cache's lock for it alone
    assert len(kept) == 1 and kept[0].startswith(".1-") and kept[0].endswith(".lock"), kept


def test_a_pickle_named_model_safetensors_is_refused_after_its_download(crafted):
    """The export's own check: nothing of it is kept."""
    from pipeline.engine.model_export import UnsafeModelFile

    error = crafted.raised.get("named")
    assert isinstance(error, UnsafeModelFile) and "is not a safetensors file" in str(error), error
    kept = crafted.kept["named"]
    assert len(kept) == 1 and kept[0].startswith(".1-") and kept[0].endswith(".lock"), kept


def test_a_good_version_pulls_only_the_export(crafted):
    assert "good" not in crafted.raised, crafted.raised.get("good")
    assert sorted(p.name for p in crafted.pulled["good"].iterdir()) == [
        "config.json",
        "model.json",
        "model.safetensors",
    ]


def test_no_code_of_a_crafted_version_ran(crafted):
    assert not crafted.code_ran


def test_a_version_of_the_export_folder_itself_still_predicts(crafted, registry, images, predicted, tmp_path):
    """A version registered before the MLflow model layout: the same labels as the version of the same export."""
    assert predict_top1(crafted.old_layout, images, registry.uri, SWIN_MODEL_CACHE=str(tmp_path)) == predicted


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


@pytest.fixture(scope="module", params=[(224, 7), (384, 12)], ids=["224", "384"])
def timm_pulled(request, registry, images, tmp_path_factory) -> SimpleNamespace:
    """A swin_nano of one image size and window (random weights, 10 classes) exported, registered as
    models:/timm_SIZE@candidate and pulled by this project; then loaded by timm's own loader and eval transform,
    without this project, in a fresh process. The pulled folder, its config.json, and what timm answered."""
    import torch
    from safetensors.torch import save_file

    from pipeline.config import RunConfig
    from pipeline.engine.model_export import model_metadata, write_timm_config
    from pipeline.model import create_model
    from pipeline.tracking.registry import pull_to_folder, register
    from pipeline.tracking.store import store_at

    size, window = request.param
    tmp_path = tmp_path_factory.mktemp(f"timm_{size}")
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

    proc = subprocess.run(
        [sys.executable, "-c", TIMM, str(folder), *map(str, images)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(registry.uri),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(
        size=size,
        window=window,
        synsets=synsets,
        crop_pct=cfg.data.crop_pct,
        preprocessing=meta["preprocessing"],
        folder=folder,
        config=json.loads((folder / "config.json").read_text()),
        timm=json.loads(proc.stdout.splitlines()[-1]),
    )


def test_a_pulled_version_names_timm_its_architecture(timm_pulled):
    config, size = timm_pulled.config, timm_pulled.size
    assert config["architecture"] == "swin_tiny_patch4_window7_224" and config["num_classes"] == 10
    assert config["label_names"] == timm_pulled.synsets
    assert {k: config["model_args"][k] for k in ("img_size", "window_size", "embed_dim", "depths", "num_heads")} == {
        "img_size": [size, size],
        "window_size": timm_pulled.window,
        "embed_dim": 32,
        "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 4, 8],
    }


def test_a_pulled_version_gives_timm_its_preprocessing(timm_pulled):
    pre, size = timm_pulled.config["pretrained_cfg"], timm_pulled.size
    assert pre["input_size"] == [3, size, size] and pre["crop_pct"] == timm_pulled.crop_pct
    assert pre["interpolation"] == "bicubic" and pre["mean"] == list(timm_pulled.preprocessing["mean"])
    assert pre["std"] == list(timm_pulled.preprocessing["std"])
    assert timm_pulled.timm["config"]["input_size"] == [3, size, size]  # what timm's loader resolved
    assert timm_pulled.timm["config"]["crop_pct"] == timm_pulled.crop_pct


def test_a_pulled_version_inherits_nothing_of_the_base_architecture(timm_pulled):
    """No tag, license, URL... of timm's swin_tiny, and never timm's pickle default."""
    config = timm_pulled.config
    inherited = {"tag", "license", "url", "hf_hub_id", "description", "paper_ids", "origin_url"}
    assert not inherited & (set(config["pretrained_cfg"]) | set(config)), inherited & set(config)
    assert not list(timm_pulled.folder.glob("*.bin")) and not list(timm_pulled.folder.glob("*.pth"))


def test_plain_timm_predicts_a_pulled_version_like_this_project(timm_pulled, registry, images):
    assert timm_pulled.timm["labels"] == predict_top1(str(timm_pulled.folder), images, registry.uri)


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


@pytest.fixture(scope="module")
def served(registry, trained, tmp_path_factory):
    """`mlflow models serve -m models:/tiny@candidate --env-manager local`, answering on its port once /ping
    does; stopped after the module's tests."""
    tmp_path = tmp_path_factory.mktemp("serve")
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
        yield port
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def image_rows(encoded: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_a_served_version_answers_each_request_format_like_predict(served, images, predicted, form):
    """The labels pipeline.predict gives, in each of MLflow's three JSON request formats (top_k as a param)."""
    encoded = [b64(p.read_bytes()) for p in images]
    payload = {
        "dataframe_split": image_rows(encoded),
        "dataframe_records": {"dataframe_records": [{"image": e} for e in encoded]},
        "inputs": {"inputs": {"image": encoded}, "params": {"top_k": 2}},
    }[form]
    status, answer = post(served, payload)
    assert status == 200, answer
    rows = answer["predictions"]
    assert [r["label"] for r in rows] == predicted
    assert all(len(r["top_labels"]) == (2 if form == "inputs" else 5) for r in rows)


def bomb() -> bytes:
    """144 MP that compress to a few kB."""
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, "PNG")
    return out.getvalue()


BAD = {  # an input, and what the answer's message must name
    "not an image": (lambda jpeg: [b"hello, this is text, not a picture"], "not an image"),
    "truncated": (lambda jpeg: [jpeg[: len(jpeg) // 2]], "truncated"),
    "bomb": (lambda jpeg: [bomb()], "too many pixels"),
    "empty": (lambda jpeg: [], "no image"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_input_is_a_400_naming_it_and_serving_goes_on(served, images, predicted, case):
    make, says = BAD[case]
    status, answer = post(served, image_rows([b64(d) for d in make(images[0].read_bytes())]))
    assert 400 <= status < 500 and says in answer.get("message", ""), (status, answer)
    status, answer = post(served, image_rows([b64(images[0].read_bytes())]))
    assert status == 200 and answer["predictions"][0]["label"] == predicted[0], answer


def test_a_served_version_answers_8_concurrent_requests(served, images, predicted):
    one = image_rows([b64(p.read_bytes()) for p in images[:4]])
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(served, one, timeout=300), range(8)))
    assert [status for status, _ in answers] == [200] * 8
    assert all([r["label"] for r in a["predictions"]] == predicted[:4] for _, a in answers)
