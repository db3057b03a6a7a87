"""`python -m pipeline.evaluate` in real processes against a real `mlflow server`: a registered model scored on a
shard set's val split, the same figures as an independent computation (each val sample decoded from the tars
and run through the model here) at a world of one and on 2 ranks under the project's launcher; the scores as
tags of the model version; --promote moving an alias only for a better top-1 (exit 3 when not); one-line errors
for what does not exist."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from runs import job_env
from servers import free_port, run_prep

pytestmark = pytest.mark.slow
NAME = "evaluated"
BATCH = 16  # 90 val samples: no multiple of 2 ranks x 16
LINE = re.compile(
    r"^models:/(?P<name>[^/]+)/(?P<version>\d+) on (?P<set>.+) \(split (?P<split>\w+), (?P<samples>\d+) "
    r"samples\): loss (?P<loss>[\d.]+), top-1 (?P<top1>[\d.]+)%, top-5 (?P<top5>[\d.]+)%$"
)


# -- fixtures: a shard set, two registered versions (random weights, and the same with a fitted classifier) ------
@pytest.fixture(scope="module")
def shards(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "digits_set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 40, "--holdout-per-class", 9)
    return out  # val: 90 samples in 3 shards


def synsets_of(shards: Path) -> list[str]:
    return json.loads((shards / "manifest.json").read_text())["label_layout"]["synsets"]


def export(folder: Path, model: torch.nn.Module, synsets: list[str], step: int) -> Path:
    from safetensors.torch import save_file

    from pipeline.config import RunConfig
    from pipeline.engine.model_export import model_metadata, write_timm_config

    cfg = RunConfig()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size = "swin_nano", 64, 4
    meta = {**model_metadata(cfg, synsets), "step": step}
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(meta))
    write_timm_config(model, folder, meta)
    return folder


def linear_probe(model: torch.nn.Module, shards: Path, samples: int = 320) -> torch.nn.Module:
    """The classifier fitted (L-BFGS, a little weight decay) on the frozen random features of the first train
    samples: ~75% top-1 on val where the random model has ~10%, in seconds on 2 cores (no backward through the
    network)."""
    from pipeline.data.loader import LoaderConfig, create_loader

    cfg = LoaderConfig(
        shards=str(shards), split="train", train=False, batch_size=samples, image_size=64, backend="torch", workers=0
    )
    images, labels = next(iter(create_loader(cfg)))
    assert (labels >= 0).all()
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    head = model.head.fc
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@pytest.fixture(scope="module")
def registry(mlflow_server, shards, tmp_path_factory):
    """Version 1: random weights; version 2: the same network with its classifier fitted. Returns (uri,
    {version: export folder})."""
    from pipeline.model import create_model
    from pipeline.tracking.registry import register

    root = tmp_path_factory.mktemp("exports")
    synsets = synsets_of(shards)
    torch.manual_seed(0)
    weak = export(root / "weak", create_model("swin_nano", 64, 4, len(synsets)).eval(), synsets, step=0)
    torch.manual_seed(1)
    strong = export(
        root / "strong", linear_probe(create_model("swin_nano", 64, 4, len(synsets)), shards), synsets, step=1
    )
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("evaluate")).info.run_id
    assert register(client, run_id, weak, NAME, []) == "1"
    assert register(client, run_id, strong, NAME, ["latest_fit"]) == "2"
    return mlflow_server.uri, {"1": weak, "2": strong}


# -- the independent computation --------------------------------------------------------------------------------
def expected_scores(folder: Path, shards: Path) -> dict:
    """Every val sample of the manifest, read from the tars (tarfile, PIL), preprocessed by the model's own eval
    transform, run through the model here: loss, top-1, top-5, samples."""
    from PIL import Image

    from pipeline.data.eval_transform import eval_transform
    from pipeline.engine.model_export import load_exported

    model, meta = load_exported(folder)
    transform = eval_transform(meta["img_size"], meta["preprocessing"]["crop_pct"])
    manifest = json.loads((shards / "manifest.json").read_text())
    images, labels = [], []
    for entry in (e for e in manifest["shards"] if e["split"] == "val"):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / entry["name"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(samples) == entry["samples"]
        for sample in samples.values():
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                images.append(transform(img.convert("RGB")))
            labels.append(int(sample["cls"]))
    with torch.no_grad():
        logits = model(torch.stack(images)).double()
    labels_t = torch.tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    n = len(labels)
    return {
        "samples": n,
        "loss": torch.nn.functional.cross_entropy(logits, labels_t, reduction="sum").item() / n,
        "top1": 100 * (top5[:, 0] == labels_t).sum().item() / n,
        "top5": 100 * (top5 == labels_t[:, None]).any(dim=1).sum().item() / n,
    }


@pytest.fixture(scope="module")
def expected(registry, shards) -> dict[str, dict]:
    _uri, folders = registry
    scores = {v: expected_scores(folder, shards) for v, folder in folders.items()}
    assert scores["2"]["top1"] > scores["1"]["top1"] + 20, scores  # the trained version is clearly better
    return scores


# -- running the command ----------------------------------------------------------------------------------------
def env(uri: str, cache: Path, **extra) -> dict[str, str]:
    return job_env(port=False, MLFLOW_TRACKING_URI=uri, SWIN_MODEL_CACHE=str(cache), SWIN_RANK_GRACE_S="2", **extra)


def evaluate(uri: str, cache: Path, *args, ranks: int = 1) -> subprocess.CompletedProcess:
    common = ["--batch-size", BATCH, "--workers", 0, "--backend", "torch"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pipeline.evaluate", *args, *common]
    else:  # the project's one-machine launcher: DeepSpeed's per-node launcher (launch/pretrain_22k.sh uses it)
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "swin_common.node_launch",
            "--procs",
            ranks,
            "--master_port",
            free_port(),
            "--module",
            "pipeline.evaluate",
            *args,
            *common,
        ]
    # from the user's own folder (the test's, which holds the cache), outside the checkout
    return subprocess.run(
        list(map(str, cmd)), cwd=cache.parent, capture_output=True, text=True, timeout=300, env=env(uri, cache)
    )


def scored(stdout: str) -> dict[str, dict]:
    """The figures lines of stdout, by version."""
    out = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            out[m["version"]] = {
                "samples": int(m["samples"]),
                "loss": float(m["loss"]),
                "top1": float(m["top1"]),
                "top5": float(m["top5"]),
                "set": m["set"],
                "split": m["split"],
            }
    return out


def assert_figures(got: dict, want: dict) -> None:
    assert got["samples"] == want["samples"] == 90
    assert got["top1"] == round(want["top1"], 2) and got["top5"] == round(want["top5"], 2), (got, want)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), (got, want)


def set_id(shards: Path) -> str:
    return f"{shards.name}-{hashlib.sha256((shards / 'manifest.json').read_bytes()).hexdigest()[:8]}"


def tags(uri: str, version: str, shards: Path) -> dict[str, str]:
    prefix = f"eval.{set_id(shards)}.val."
    return {
        k[len(prefix) :]: v
        for k, v in MlflowClient(uri).get_model_version(NAME, version).tags.items()
        if k.startswith(prefix)
    }


# -- the tests --------------------------------------------------------------------------------------------------
def test_scores_promotion_and_two_ranks(registry, expected, shards, tmp_path):
    uri, _folders = registry
    client = MlflowClient(uri)
    cache = tmp_path / "cache"

    # 1. a world of one, no champion yet: the random version is scored, its scores tagged, and promoted
    one = evaluate(
        uri, cache, f"models:/{NAME}/1", "--shards", shards, "--promote", "champion", "--if-better-than", "champion"
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert "90 samples, 1 rank(s)" in one.stderr
    figures = scored(one.stdout)
    assert set(figures) == {"1"}, one.stdout
    assert_figures(figures["1"], expected["1"])
    assert figures["1"]["set"] == str(shards) and figures["1"]["split"] == "val"
    assert f"champion names no version of {NAME} yet: the first promotion of champion" in one.stdout
    assert "champion -> version 1" in one.stdout
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    recorded = tags(uri, "1", shards)
    assert recorded["samples"] == "90" and recorded["shards"] == str(shards)
    assert float(recorded["top1"]) == pytest.approx(expected["1"]["top1"], abs=1e-6)
    assert float(recorded["top5"]) == pytest.approx(expected["1"]["top5"], abs=1e-6)
    assert float(recorded["loss"]) == pytest.approx(expected["1"]["loss"], abs=1e-5)

    # 2. the champion's scores gone: on 2 ranks the better version is scored, then the champion too (it has no
    # score on this set now), with the world of one's figures; better, so the alias moves
    for key in tags(uri, "1", shards):
        client.delete_model_version_tag(NAME, "1", f"eval.{set_id(shards)}.val.{key}")
    two = evaluate(
        uri,
        cache,
        f"models:/{NAME}@latest_fit",
        "--shards",
        shards,
        "--promote",
        "champion",
        "--if-better-than",
        "champion",
        ranks=2,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    assert "90 samples, 2 rank(s)" in two.stderr and "has no score on" in two.stderr, two.stderr[-4000:]
    figures2 = scored(two.stdout)
    assert set(figures2) == {"1", "2"}, two.stdout
    assert_figures(figures2["2"], expected["2"])
    assert {k: figures2["1"][k] for k in ("samples", "top1", "top5")} == {
        k: figures["1"][k] for k in ("samples", "top1", "top5")
    }
    assert figures2["1"]["loss"] == pytest.approx(figures["1"]["loss"], abs=1e-4)
    assert two.stdout.count(f"on {shards} (split val, 90 samples)") == 2  # rank 0 alone prints
    versus = [line for line in two.stdout.splitlines() if line.startswith("candidate ")]
    assert versus == [
        f"candidate models:/{NAME}/2 top-1 {figures2['2']['top1']:.2f}% vs champion models:/{NAME}/1 "
        f"top-1 {figures['1']['top1']:.2f}% on {shards} (split val): champion -> version 2"
    ], two.stdout
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"
    assert tags(uri, "2", shards)["samples"] == "90" and tags(uri, "1", shards)["top1"] == recorded["top1"]

    # 3. the weaker version again, on 2 ranks: the champion's recorded score is compared (nothing rescored), not
    # better: exit 3 on every rank, passed on by the launcher, and the alias stays
    again = evaluate(
        uri,
        cache,
        f"models:/{NAME}/1",
        "--shards",
        shards,
        "--promote",
        "champion",
        "--if-better-than",
        "champion",
        ranks=2,
    )
    assert again.returncode == 3, again.stderr[-4000:]
    assert set(scored(again.stdout)) == {"1"}, again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("candidate ")] == [
        f"candidate models:/{NAME}/1 top-1 {figures['1']['top1']:.2f}% vs champion models:/{NAME}/2 top-1 "
        f"{figures2['2']['top1']:.2f}% on {shards} (split val): not better: champion stays at version 2"
    ]
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"


def one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


def test_what_does_not_exist_is_one_line_naming_it(registry, shards, tmp_path):
    uri, _folders = registry
    cache = tmp_path / "cache"
    one_error_line(
        evaluate(uri, cache, f"models:/{NAME}@nope", "--shards", shards),
        f"models:/{NAME}@nope",
        f"the registered model {NAME} has no alias 'nope' (its aliases: ",
    )
    one_error_line(
        evaluate(uri, cache, f"models:/{NAME}/1", "--shards", tmp_path / "no_set"),
        f"shard set not found: {tmp_path / 'no_set'}",
    )
    one_error_line(
        evaluate(uri, cache, f"models:/{NAME}/1", "--shards", shards, "--split", "test"),
        str(shards),
        "no 'test' split",
        "train, val",
    )
    # a gate a typo cannot open: an alias to beat that names no version is an error unless it is the alias being
    # promoted (its first promotion); nothing is scored and nothing moves
    typo = evaluate(
        uri, cache, f"models:/{NAME}/1", "--shards", shards, "--promote", "prod", "--if-better-than", "prdo"
    )
    one_error_line(
        typo, "--if-better-than prdo", f"the registered model {NAME} has no alias 'prdo'", "prod is not moved"
    )
    assert "scoring" not in typo.stderr and "prod" not in (MlflowClient(uri).get_registered_model(NAME).aliases or {})
    # the same typo where the alias being moved names a version already: an error, and the alias stays
    moved = evaluate(
        uri, cache, f"models:/{NAME}/1", "--shards", shards, "--promote", "latest_fit", "--if-better-than", "latset_fit"
    )
    one_error_line(moved, "--if-better-than latset_fit", f"the registered model {NAME} has no alias 'latset_fit'")
    assert "scoring" not in moved.stderr
    assert MlflowClient(uri).get_model_version_by_alias(NAME, "latest_fit").version == "2"


def test_a_model_is_scored_on_a_set_whose_synsets_it_covers(shards):
    """The set's labels map to the model's classifier rows by synset; a set synset the model lacks is refused."""
    from pipeline.evaluate import head_rows, map_head
    from swin_common.cli import CommandError

    synsets = synsets_of(shards)
    assert head_rows(synsets, synsets, "models:/m/1", "SET") is None
    wider = ["n99999999", *reversed(synsets)]
    rows = head_rows(wider, synsets, "models:/m/1", "SET")
    assert [wider[r] for r in rows] == synsets
    logits = torch.arange(len(wider), dtype=torch.float32)[None, :]
    assert map_head(lambda x: logits, rows)(None).tolist() == [[float(r) for r in rows]]
    with pytest.raises(
        CommandError,
        match=r"models:/m/1 cannot be scored on SET: 1 of the set's 10 synsets are "
        r"not among the model's 9 classes \(n00000009\)",
    ):
        head_rows(synsets[:9], synsets, "models:/m/1", "SET")
