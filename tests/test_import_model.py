"""python -m pipeline.import_model, init_from of a released file and the released model as the bar to beat, run as
a user runs them, from a folder outside the checkout: Microsoft's layout is made from a timm model by
tests/released_files.py (the documented renames), the heads are Microsoft's 21,841 rows and the 1K order."""

from __future__ import annotations

import hashlib
import http.server
import json
import sys
import threading

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from conftest import run_prep
from pipeline.model import create_model
from pipeline.model.head_layouts import imagenet_1k, microsoft_22k, readable_names
from released_files import microsoft_release, perturbed
from runs import job_env, run
from servers import REPO, free_port
from stores import local_store

IMPORT = (sys.executable, "-m", "pipeline.import_model")
# a "1K" set of real synsets: three that Microsoft's map puts at rows 359, 5676 and 21817 of its 22K head, and the
# 1K class that 22K lacks (teddy bear), which must start fresh
SYNSETS = {"n01440764": 359, "n03042490": 5676, "n15075141": 21817, "n04399382": -1}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Microsoft-layout release files of swin_nano: its 22K head at the tiny recipe's pretraining size (64, window
    4), and a 1K head at the fine-tune's (96, window 6); with the timm models they were made from."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    in22k = perturbed(create_model("swin_nano", 64, 4, len(microsoft_22k())))
    in1k = perturbed(create_model("swin_nano", 96, 6, len(imagenet_1k())), seed=1)
    return {
        "22k": (microsoft_release(in22k, root / "swin_nano_patch4_window4_64_22k.pth"), in22k),
        "1k": (microsoft_release(in1k, root / "swin_nano_patch4_window6_96_22kto1k.pth"), in1k),
    }


def test_an_imported_release_is_an_export_with_microsofts_synsets(tmp_path, released):
    """The export of Microsoft's 22K file: its head rows named in Microsoft's order with WordNet's words; timm's
    local-dir: loads the folder to the source's logits; predict names the class in words."""
    pth, source = released["22k"]
    out = run([*IMPORT, pth, "--out", "imported"], cwd=tmp_path, env=job_env(port=False))
    folder = tmp_path / "imported"
    assert str(folder) in out.stdout
    meta = json.loads((folder / "model.json").read_text())
    assert meta["synsets"] == list(microsoft_22k())
    assert (meta["arch"], meta["img_size"], meta["window_size"]) == ("swin_nano", 64, 4)
    assert meta["source"]["format"] == "microsoft" and meta["source"]["head_layout"] == "microsoft-22k"
    assert meta["label_descriptions"][359] == "tench, Tinca tinca"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    Image.new("RGB", (80, 70), (90, 120, 30)).save(tmp_path / "photo.jpg")
    top = run([sys.executable, "-m", "pipeline.predict", "imported", "photo.jpg", "-k", "21841"], cwd=tmp_path)
    tench = next(line for line in top.stdout.splitlines() if " n01440764 " in line)
    assert tench.endswith("(class 359)  tench, Tinca tinca"), tench


def test_import_errors_are_one_line_naming_the_file(tmp_path, released):
    """A head that --labels does not fit, a pickle that needs more than tensors, a file of no Swin: exit 2, one
    line, the absolute path named."""
    (tmp_path / "two.txt").write_text("n01440764\nn03042490\n")
    weights = torch.load(released["22k"][0], weights_only=True)["model"]
    torch.save({"model": weights, "config": Image.new("RGB", (1, 1))}, tmp_path / "code.pth")  # an object
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    cases = {
        (str(released["22k"][0]), "--labels", "two.txt"): f"--labels {tmp_path / 'two.txt'} lists 2 synsets",
        ("code.pth",): f"{tmp_path / 'code.pth'}: refused: unpickling it needs more than tensors",
        ("resnet.pth",): f"source={tmp_path / 'resnet.pth'} holds no Swin weights",
    }
    for args, says in cases.items():
        proc = run([*IMPORT, *args, "--out", "out"], cwd=tmp_path, check=False, env=job_env(port=False))
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and says in error[0], (args, proc.stderr[-3000:])
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def set_1k(digits_tars, tmp_path_factory):
    """A shard set whose synsets are real 1K synsets (digit images under their names)."""
    root = tmp_path_factory.mktemp("set_1k")
    (root / "src").mkdir()
    for digit, synset in enumerate(SYNSETS):
        (root / "src" / f"{synset}.tar").symlink_to(digits_tars / f"n{digit:08d}.tar")
    run_prep(
        "shard", "--source", root / "src", "--out", root / "shards", "--max-samples", 120, "--holdout-per-class", 10
    )
    return root / "shards"


@pytest.fixture(scope="module")
def bar_to_beat(released, set_1k, tmp_path_factory):
    """The paper's 22K -> 1K fine-tune straight from Microsoft's 22K file, where the released 1K model, imported and
    registered as champion, is the bar: fine-tune (registered as candidate), evaluate --promote champion
    --if-better-than champion. Every command from the user's folder; the phases are the tests below."""
    user = tmp_path_factory.mktemp("user")
    store = local_store(user / "store")
    env = job_env(port=False, MLFLOW_TRACKING_URI=store)
    run([*IMPORT, released["1k"][0], "--out", "ms_1k"], cwd=user, env=env)
    champion = run(
        [
            sys.executable,
            "-m",
            "pipeline.register",
            "--model",
            "ms_1k",
            "--name",
            "tiny_22kto1k",
            "--alias",
            "champion",
        ],
        cwd=user,
        env=env,
    )
    fine = run(
        [
            "bash",
            REPO / "launch/finetune_1k_384.sh",
            "--config",
            "configs/tiny_22kto1k.yaml",
            "name=fine",
            "out_dir=runs",
            "tracking.model_name=tiny_22kto1k",
            f"init_from={released['22k'][0]}",
            f"data.shards={set_1k}",
            "train.max_steps=8",
            "train.global_batch=32",
            "train.micro_batch=16",
            "data.workers=1",
        ],
        cwd=user,
        env={**env, "MASTER_PORT": str(free_port())},
    )
    gate = run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "models:/tiny_22kto1k@candidate",
            "--shards",
            set_1k,
            "--promote",
            "champion",
            "--if-better-than",
            "champion",
        ],
        cwd=user,
        env=env,
        check=False,
    )
    released_1k = run(
        [sys.executable, "-m", "pipeline.evaluate", released["1k"][0], "--shards", set_1k, "--workers", "1"],
        cwd=user,
        env=env,
    )
    return {
        "user": user,
        "store": store,
        "champion": champion,
        "fine": fine,
        "gate": gate,
        "released": released_1k,
        "released_file": str(released["1k"][0]),
    }


class TestBarToBeat:
    def test_the_import_registers_without_a_run_of_its_own(self, bar_to_beat):
        """Its own MLflow run, the version tagged with its first classes in words."""
        from mlflow.tracking import MlflowClient

        assert bar_to_beat["champion"].stdout.split()[:2] == ["models:/tiny_22kto1k/1", "models:/tiny_22kto1k@champion"]
        version = MlflowClient(bar_to_beat["store"]).get_model_version("tiny_22kto1k", "1")
        assert version.tags["labels_head"].startswith("n01440764 tench, n01443537 goldfish")
        assert MlflowClient(bar_to_beat["store"]).get_run(version.run_id).data.params["head_layout"] == "imagenet-1k"

    def test_the_fine_tune_maps_microsofts_rows_by_synset(self, bar_to_beat):
        """init.json and head_map.json: each 1K class from its row of Microsoft's head, teddy bear fresh, every
        bias table resized (window 4 -> 6), the head read as Microsoft's layout."""
        run_dir = bar_to_beat["user"] / "runs" / "fine"
        init = json.loads((run_dir / "init.json").read_text())
        assert init["source_head_layout"] == "microsoft-22k"
        assert init["fresh_synsets"] == ["n04399382"] and init["init_head_rows_mapped"] == 3
        assert len(init["resized_tables"]) == 8
        head_map = json.loads((run_dir / "head_map.json").read_text())
        assert head_map["source_index"] == [SYNSETS[s] for s in sorted(SYNSETS)]

    def test_the_fine_tune_is_scored_against_the_released_model(self, bar_to_beat):
        """Both versions are scored on the set and the alias follows the better top-1 (exit 0 moved, 3 stayed)."""
        from mlflow.tracking import MlflowClient

        gate = bar_to_beat["gate"]
        assert gate.returncode in (0, 3), gate.stderr[-4000:]
        client = MlflowClient(bar_to_beat["store"])
        tops = {
            v: next(
                float(x) for k, x in client.get_model_version("tiny_22kto1k", v).tags.items() if k.endswith(".top1")
            )
            for v in ("1", "2")
        }
        winner = "2" if tops["2"] > tops["1"] else "1"
        assert str(client.get_model_version_by_alias("tiny_22kto1k", "champion").version) == winner
        assert gate.returncode == (0 if winner == "2" else 3)

    def test_the_release_file_itself_scores_as_its_registered_import(self, bar_to_beat):
        """evaluate of the .pth (imported on the fly, nothing recorded) gives the registered import's top-1."""
        from mlflow.tracking import MlflowClient

        line = bar_to_beat["released"].stdout.strip().splitlines()[-1]
        tags = MlflowClient(bar_to_beat["store"]).get_model_version("tiny_22kto1k", "1").tags
        top1 = next(float(v) for k, v in tags.items() if k.endswith(".top1"))
        assert f"top-1 {top1:.2f}%" in line and line.startswith(bar_to_beat["released_file"]), line

    def test_the_served_model_names_each_class_in_words(self, bar_to_beat, tmp_path):
        """MLflow's pyfunc of the registered import answers a `name` beside each label: WordNet's words for it."""
        Image.new("RGB", (90, 90), (200, 30, 60)).save(tmp_path / "photo.png")
        code = (
            "import json, sys, mlflow, pandas as pd\n"
            "model = mlflow.pyfunc.load_model('models:/tiny_22kto1k/1')\n"
            "out = model.predict(pd.DataFrame({'image': [open(sys.argv[1], 'rb').read()]}))\n"
            "print(json.dumps({'label': out['label'][0], 'name': out['name'][0]}))\n"
        )
        env = job_env(port=False, MLFLOW_TRACKING_URI=bar_to_beat["store"])
        answer = json.loads(run([sys.executable, "-c", code, tmp_path / "photo.png"], env=env).stdout.splitlines()[-1])
        assert answer["name"] == readable_names([answer["label"]])[0] != "", answer


class LoopbackHub(http.server.ThreadingHTTPServer):
    """A Hugging Face Hub on loopback that serves `files` ({"REPO/FILENAME": bytes}, revision main) the way the Hub
    answers huggingface_hub's HEAD and GET, so that huggingface_hub itself writes the user's cache."""

    def __init__(self, files: dict[str, bytes]):
        files_by_path = {
            f"/{name.split('/', 2)[0]}/{name.split('/', 2)[1]}/resolve/main/{name.split('/', 2)[2]}": data
            for name, data in files.items()
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                data = files_by_path.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_a_timm_name_comes_from_the_hugging_face_cache_offline(tmp_path):
    """timm:NAME is timm's own pretrained loading: fetched once into the user's Hugging Face cache (huggingface_hub
    writes it, from a Hub on loopback), then imported with HF_HUB_OFFLINE=1 and the Hub gone, to the same weights."""
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=1000).eval()
    name = "swin_tiny_patch4_window7_224.ms_in1k"
    hub = LoopbackHub({f"timm/{name}/model.safetensors": safetensors.torch.save(source.state_dict())})
    env = job_env(port=False, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url)
    try:
        run([*IMPORT, f"timm:{name}", "--out", "online"], cwd=tmp_path, env=env)
    finally:
        hub.shutdown()
        hub.server_close()
    assert list((tmp_path / "hf" / "hub").glob(f"models--timm--{name}/snapshots/*/model.safetensors"))
    out = run([*IMPORT, f"timm:{name}", "--out", "offline"], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"})
    assert "1000 classes (imagenet-1k)" in out.stdout
    weights = safetensors.torch.load_file(tmp_path / "offline" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
