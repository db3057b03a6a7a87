"""What is loaded from outside is never executed, and names from data never become paths outside their folder:
pickles named model.safetensors (export, init_from, registry), the project's own checkpoint rank files
(weights_only), crafted sample keys and tar member names (held-out images, stores, prep), and launcher
variables split without glob expansion."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_prep.shardset.store import LocalStore, S3Store, UnsafePath
from pipeline.config import RunConfig
from pipeline.engine.checkpoint import read_rank_file, rng_state, set_rng_state
from pipeline.engine.model_export import UnsafeModelFile, check_safetensors, load_exported, load_source, model_metadata
from pipeline.model import create_model
from servers import REPO, run_prep

SYNSETS = [f"n{i:08d}" for i in range(3)]


class RunsCode:
    """Unpickling this creates the folder `path`: the proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def tiny_state() -> tuple[dict[str, torch.Tensor], dict]:
    cfg = RunConfig()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size = "swin_nano", 64, 4
    model = create_model("swin_nano", 64, 4, len(SYNSETS))
    return {k: v.contiguous() for k, v in model.state_dict().items()}, model_metadata(cfg, SYNSETS)


def export_folder(folder: Path, pickled: bool = False, marker: Path | None = None, step: int = 0) -> Path:
    """An export folder as pipeline.export writes it; `pickled`: model.safetensors is really torch.save's pickle."""
    state, meta = tiny_state()
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({**meta, "step": step}))
    if pickled:
        torch.save({**state, "extra": RunsCode(marker)}, folder / "model.safetensors")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


# --- safetensors only -------------------------------------------------------------------------------------


def test_only_real_safetensors_pass_the_check(tmp_path):
    state, _ = tiny_state()
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    check_safetensors(good)  # no error

    marker = tmp_path / "code-ran"
    cases = {
        "zip.safetensors": (lambda p: torch.save({"w": RunsCode(marker)}, p), "zip archive, as torch.save writes"),
        "legacy.safetensors": (
            lambda p: torch.save({"w": RunsCode(marker)}, p, _use_new_zipfile_serialization=False),
            "Python pickle",
        ),
        "plain.safetensors": (lambda p: p.write_bytes(pickle.dumps(RunsCode(marker))), "Python pickle"),
        "empty.safetensors": (lambda p: p.write_bytes(b""), "a file of 0 bytes"),
        "junk.safetensors": (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
            "without a safetensors header",
        ),
    }
    for name, (write, what) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(UnsafeModelFile) as e:
            check_safetensors(path, origin="models:/x@y")
        assert str(path) in str(e.value) and "models:/x@y" in str(e.value) and what in str(e.value), str(e.value)
    assert not marker.exists()


def test_load_exported_refuses_a_pickle_named_model_safetensors(tmp_path):
    model, meta = load_exported(export_folder(tmp_path / "good"))  # the real thing loads
    assert meta["synsets"] == SYNSETS and model.head.fc.out_features == 3

    marker = tmp_path / "code-ran"
    evil = export_folder(tmp_path / "evil", pickled=True, marker=marker)
    with pytest.raises(UnsafeModelFile, match=r"evil/model\.safetensors is not a safetensors file.*torch\.save"):
        load_exported(evil)
    assert not marker.exists()


def test_load_source_refuses_a_pickle_named_model_safetensors(tmp_path):
    source = load_source(str(export_folder(tmp_path / "good")))
    assert source.synsets == SYNSETS and "head.fc.weight" in source.state

    marker = tmp_path / "code-ran"
    evil = export_folder(tmp_path / "evil", pickled=True, marker=marker)
    for init_from in (evil, evil / "model.safetensors"):  # the folder, or the file beside its model.json
        with pytest.raises(UnsafeModelFile, match=r"evil/model\.safetensors is not a safetensors file"):
            load_source(str(init_from))
    assert not marker.exists()


def test_register_refuses_what_a_pull_would_refuse(tmp_path):
    """An export whose model.safetensors is a pickle, or that holds a pickled model beside good weights, is
    never registered (a real sqlite store); the pull's own refusals: tests/test_registry.py."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import register

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("untrusted", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    marker = tmp_path / "code-ran"
    evil = export_folder(tmp_path / "evil", pickled=True, marker=marker, step=1)
    with pytest.raises(UnsafeModelFile, match=r"evil/model\.safetensors \(from .*evil\) is not a safetensors file"):
        register(client, run_id, evil, "evil", ["current"])
    extra = export_folder(tmp_path / "extra", step=2)
    torch.save({"w": RunsCode(marker)}, extra / "model.pth")
    with pytest.raises(UnsafeModelFile, match=r"extra holds model\.pth: refused"):
        register(client, run_id, extra, "extra", ["current"])
    assert not marker.exists() and client.search_registered_models() == []
    assert str(register(client, run_id, export_folder(tmp_path / "good"), "good", ["current"])) == "1"


# --- the project's own checkpoint rank files ---------------------------------------------------------------


def test_rank_files_hold_tensors_and_plain_values_only(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # numpy's cached gaussian is part of its state
    random.gauss(0, 1)
    path = tmp_path / "step_00000001"
    path.mkdir()
    torch.save({"rng": rng_state(), "loader": {"epoch": 2, "position": 96, "seed": 0}}, path / "rank_00000.pt")
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.normal(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
    )
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    own = read_rank_file(path / "rank_00000.pt")  # torch.load(weights_only=True) inside
    set_rng_state(own["rng"])
    assert own["loader"] == {"epoch": 2, "position": 96, "seed": 0}
    again = (
        random.random(),
        random.gauss(0, 1),
        np.random.normal(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
    )
    assert again == expected

    # a rank file holding pickled objects (here python/numpy state tuples, a numpy array) is refused with a clear
    # error, not unpickled
    torch.save(
        {"rng": {"python": random.getstate(), "numpy": np.random.get_state()}, "loader": {}}, path / "rank_00000.pt"
    )
    with pytest.raises(
        RuntimeError,
        match=r"rank_00000\.pt holds more than tensors and plain values "
        r"\(Unsupported global: .*_reconstruct\), so it is not loaded: not a "
        r"rank file this project wrote",
    ):
        read_rank_file(path / "rank_00000.pt")


# --- names from data never become paths outside their folder ------------------------------------------------


def jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 255 - value, 128)).save(buf, "JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


CRAFTED = ["../../evil", "a/b", "/abs/p", "x\x00y\u00e9", "n00000001_good"]  # NUL survives in a pax header


def test_held_out_images_never_write_outside_their_folder(tmp_path, capsys):
    from pipeline.demo import held_out_images

    shards = tmp_path / "deep" / "er" / "shards"
    (shards / "val").mkdir(parents=True)
    with tarfile.open(shards / "val" / "shard-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(CRAFTED):
            add(tar, f"{key}.cls", b"1")
            add(tar, f"{key}.jpg", jpeg_bytes(40 * i))
            add(tar, f"{key}.json", json.dumps({"synset": "n00000001"}).encode())
    assert {m.name for m in tarfile.open(shards / "val" / "shard-000000.tar")} >= {
        "../../evil.jpg",
        "/abs/p.jpg",
        "x\x00y\u00e9.jpg",
    }
    before = files_under(tmp_path)
    out = shards.parent / "held_out"
    images = held_out_images(str(shards), out, 10)

    written = files_under(tmp_path) - before
    assert written == {p for p, _ in images} and all(p.parent == out for p in written)
    assert sorted(p.name for p in written) == sorted(
        ["______evil.jpg", "a_b.jpg", "_abs_p.jpg", "x_y_.jpg", "n00000001_good.jpg"]
    )
    assert not (tmp_path / "deep" / "evil.jpg").exists() and not Path("/abs/p.jpg").exists()
    assert (out / "a_b.jpg").read_bytes() == jpeg_bytes(40)  # the sample's own bytes, under a safe name
    said = capsys.readouterr().out
    assert "sample key '../../evil' in val/shard-000000.tar is not [A-Za-z0-9_-]: written as ______evil.jpg" in said
    assert "n00000001_good" not in said


def test_store_paths_never_leave_the_store(tmp_path):
    root = tmp_path / "store"
    store = LocalStore(root)
    store.write_bytes("val/shard-000000.tar", b"ok")
    assert store.read("val/shard-000000.tar") == b"ok" and store.exists("val/shard-000000.tar")
    for bad in ("../evil.tar", "val/../../evil.tar", "/tmp/evil.tar", "val/x\x00.tar", ".."):
        for call, args in (
            (store.write_bytes, (bad, b"x")),
            (store.read, (bad,)),
            (store.exists, (bad,)),
            (store.staging_path, (bad,)),
            (store.local_path, (bad,)),
        ):
            with pytest.raises(UnsafePath, match="is not a path inside .*store: absolute paths, '..' segments"):
                call(*args)
    # a bad read among good ones is that read's error, like a missing file (prep rejects that input)
    results = list(store.read_many([("val/shard-000000.tar", 0, None), ("../evil.tar", 0, None)]))
    assert results[0] == b"ok" and isinstance(results[1], UnsafePath)
    assert files_under(tmp_path) == {root / "val" / "shard-000000.tar"}
    assert LocalStore(root)._path("a/..b/c..d") == root / "a/..b/c..d"  # dots inside a name are fine

    s3 = S3Store("bucket", "sets/in22k")  # keys are checked before any request (no client is made here)
    assert s3._key("train/shard-000000.tar") == "sets/in22k/train/shard-000000.tar"
    for bad in ("../other/x.tar", "train/../../x", "/x.tar", "a\x00b"):
        with pytest.raises(UnsafePath, match=r"is not a path inside s3://bucket/sets/in22k"):
            s3._key(bad)
        with pytest.raises(UnsafePath):
            s3.staging_path(bad)
    assert s3._client is None


def test_a_crafted_source_tar_cannot_make_prep_write_outside_out(tmp_path):
    """Per-synset tars whose members are named ../../evil.JPEG, a/b.JPEG, /abs/p.JPEG and with a NUL: prep
    writes only inside OUT, under sanitised keys, and records each member's name as its "source"."""
    source = tmp_path / "work" / "src"
    source.mkdir(parents=True)
    members = [
        "../../evil.JPEG",
        "a/b.JPEG",
        "/abs/p.JPEG",
        "x\x00y\u00e9.JPEG",
        "../../../n00000000.tar",
        "n00000000_1.JPEG",
        "n00000000_2.JPEG",
    ]
    for s, synset in enumerate(SYNSETS[:2]):
        with tarfile.open(source / f"{synset}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i, name in enumerate(members):
                add(tar, name, jpeg_bytes(20 * i + s))
    out = tmp_path / "work" / "out"
    before = files_under(tmp_path)
    run_prep(
        "shard", "--source", source, "--out", out, "--holdout-per-class", 1, "--max-samples", 5, cwd=source
    )  # cwd inside the source: a relative ../../ from there is still outside OUT

    written = files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written), sorted(map(str, written))
    assert not (tmp_path / "evil.JPEG").exists() and not (tmp_path / "work" / "evil.JPEG").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["train"]["samples"] + manifest["totals"]["val"]["samples"] == 2 * len(members)
    keys, sources = set(), set()
    for shard in out.glob("*/shard-*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"), key
                keys.add(key)
                if ext == "json":
                    sources.add(json.loads(tar.extractfile(m).read())["source"])
    assert {"n00000000_______evil", "n00000000_a_b", "n00000000__abs_p", "n00000000_x_y_"} <= keys
    assert {"n00000000.tar/../../evil.JPEG", "n00000000.tar/a/b.JPEG", "n00000001.tar/x\x00y\u00e9.JPEG"} <= sources


def test_listed_paths_that_leave_the_source_are_rejected():
    """An S3 source can list keys such as 'prefix/n01/../x.JPEG' or with a NUL: rejected, never read."""
    from data_prep.sources import _scan_imagefolder

    class Listed:  # what S3Store lists for such a bucket (a local folder cannot hold these names)
        url = "s3://raw/imagenet"
        keys = [
            ("n01/a.JPEG", 10),
            ("n01/../../x.JPEG", 10),
            ("n01/b\x00.JPEG", 10),
            ("/n01/c.JPEG", 10),
            ("../n02/d.JPEG", 10),
        ]

        def list_dir(self):  # S3's delimiter listing: '/n01/c.JPEG' is under '', '../n02/d.JPEG' under '..'
            return sorted({k.split("/", 1)[0] for k, _ in self.keys}), []

        def list(self, prefix=""):
            yield from [(k, n) for k, n in self.keys if k.startswith(prefix.rstrip("/") + "/")]

    listing = _scan_imagefolder(Listed())
    assert [listing.item(i).path for i in range(len(listing))] == ["n01/a.JPEG"]
    assert sorted(p for p, _ in listing.rejected) == ["../", "/", "n01/../../x.JPEG", "n01/b\x00.JPEG"]
    assert all(
        "is not a path inside s3://raw/imagenet" in why or "not a class folder name" in why
        for _, why in listing.rejected
    )
    assert listing.synsets == ["n01"]


# --- launcher variables are split without glob expansion ---------------------------------------------------


def argv_printer(tmp_path: Path) -> Path:
    """An interpreter stand-in for PYTHON= that writes the argv it was started with as JSON."""
    script = tmp_path / "print-argv"
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open(os.environ['ARGV_OUT'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    return script


def launcher_env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "LOCAL_RANK", "HOSTFILE", "DS_", "SRUN_", "PREP_", "NUM_", "MASTER_"))
    }
    return {**env, "PYTHON": str(argv_printer(tmp_path)), "ARGV_OUT": str(tmp_path / "argv.jsonl"), **extra}


def argv_of(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]


def launched_after_the_check(tmp_path: Path, launch_dir: Path, args: list[str]) -> list[str]:
    """The launch's argv, after checking that the launch script first ran the train command's --check with the
    same arguments, unexpanded (python -m pipeline.train --check --launch-dir DIR ARGS)."""
    check, launch = argv_of(tmp_path)
    assert check == ["-m", "pipeline.train", "--check", "--launch-dir", str(launch_dir), *args], check
    return launch


@pytest.fixture
def folder_of_files(tmp_path) -> Path:
    """The working directory: a glob `*` or `node[1-2]` here would expand to these names."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("a.txt", "b.txt", "node1", "node2"):
        (cwd / name).write_text("")
    return cwd


def test_ds_launcher_args_reach_the_launcher_unexpanded(tmp_path, folder_of_files):
    env = launcher_env(tmp_path, NUM_GPUS="2", DS_LAUNCHER_ARGS="--foo *  --include node[1-2]\n--bar ?.txt")
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain_22k.sh"), "--config", "x.yaml", "a=*"],
        cwd=folder_of_files,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    argv = launched_after_the_check(tmp_path, folder_of_files, ["--config", "x.yaml", "a=*"])
    assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
    assert argv[argv.index("--foo") :] == [
        "--foo",
        "*",
        "--include",
        "node[1-2]",
        "--bar",
        "?.txt",
        "--module",
        "pipeline.train",
        "--launch-dir",
        str(folder_of_files),
        "--config",
        "x.yaml",
        "a=*",
    ]

    env.pop("DS_LAUNCHER_ARGS")  # unset: nothing extra
    (tmp_path / "argv.jsonl").unlink()
    subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain_22k.sh"), "--config", "x.yaml"],
        cwd=folder_of_files,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # one machine, the count known: DeepSpeed's per-node launcher without the runner
    argv = launched_after_the_check(tmp_path, folder_of_files, ["--config", "x.yaml"])
    assert argv[:5] == ["-u", "-m", "swin_common.node_launch", "--procs", "2"], argv
    assert argv[argv.index("--master_port") :] == [
        "--master_port",
        "29500",
        "--module",
        "pipeline.train",
        "--launch-dir",
        str(folder_of_files),
        "--config",
        "x.yaml",
    ]


def test_srun_and_prep_args_reach_their_commands_unexpanded(tmp_path, folder_of_files):
    bin_dir = tmp_path / "bin"  # srun itself is Slurm's; here a stand-in on PATH records what it was given
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(argv_printer(tmp_path))
    slurm = {
        "SWIN_REPO": str(REPO),
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    env = launcher_env(tmp_path, SRUN_ARGS="--cpu-bind=none --nodelist node[1-2] *", **slurm)
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm" / "pretrain_22k.sbatch"), "--config", "x.yaml"],
        cwd=folder_of_files,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    argv = launched_after_the_check(tmp_path, folder_of_files, ["--config", "x.yaml"])
    assert argv == [
        "--kill-on-bad-exit=1",
        "--cpu-bind=none",
        "--nodelist",
        "node[1-2]",
        "*",
        env["PYTHON"],
        "-u",
        "-m",
        "pipeline.train",
        "--launch-dir",
        str(folder_of_files),
        "--config",
        "x.yaml",
    ]

    (tmp_path / "argv.jsonl").unlink()
    env = launcher_env(tmp_path, PREP_SOURCE="src", PREP_OUT="out", PREP_ARGS="--max-samples 5 --layout *.txt", **slurm)
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm" / "prep_shards.sbatch")],
        cwd=folder_of_files,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    [argv] = argv_of(tmp_path)
    assert argv[-4:] == ["--max-samples", "5", "--layout", "*.txt"]
