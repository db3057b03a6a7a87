"""`python -m data_prep index` on shard sets other tools wrote (issue 35, point 1): webdataset's ShardWriter in
timm's layout (jpg + cls + json, an info.json), GNU tar from a folder, Python's tarfile with folders and dots in
keys, png/webp images, a corrupt member and a truncated last shard. Each is indexed without a byte of the source
changing; the manifest, layout, labels and bad counts are checked, a rerun is byte-identical and skips done
shards, Slurm array tasks split the work, one indexed set trains a tiny model, and webdataset still reads the
source."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_prep
from data_prep.cli import main as data_prep
from data_prep.embedded import digit_jpegs
from data_prep.shardset.reader import open_shard_set
from data_prep.verify import verify
from runs import metrics, run, small

SYNSETS = [f"n{d:08d}" for d in range(10)]


def tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256): a source before and after, or an index and its rerun."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def index(*args, env=None) -> dict:
    """`python -m data_prep index ARGS` in this process (faster than a new interpreter); its JSON summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_prep(["index", *map(str, args)]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def digits() -> list[tuple[str, str, bytes]]:
    """(synset, file name, JPEG) of 80 digits, every class present."""
    return digit_jpegs(size=32)[:80]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("layout") / "synsets.txt"
    path.write_text("".join(s + "\n" for s in SYNSETS))
    return path


@pytest.fixture(scope="module")
def timm_set(tmp_path_factory, digits) -> Path:
    """timm's published layout, written by webdataset's ShardWriter: 2 train shards of 25 (jpg, cls, json with
    class_name and label_12k, -1 for digits 5-9), 1 validation shard of 20, and an info.json. Sample 3's json
    names another synset than its cls (the layout check counts it)."""
    root = tmp_path_factory.mktemp("timm") / "imagenet-1k-wds"
    root.mkdir()
    info: dict = {"name": "digits-wds", "splits": {}}
    for split, part, per_shard in (("train", digits[:50], 25), ("validation", digits[50:70], 20)):
        pattern = str(root / f"digits-{split}-%04d.tar")
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
            for i, (synset, name, data) in enumerate(part):
                label = SYNSETS.index(synset)
                named = SYNSETS[(label + 1) % 10] if (split, i) == ("train", 3) else synset
                doc = {"filename": name, "class_name": named, "label_12k": label if label < 5 else -1}
                sink.write({"__key__": name.split(".")[0], "jpg": data, "cls": label, "json": doc})
        names = [f"digits-{split}-{i:04d}.tar" for i in range(len(part) // per_shard)]
        info["splits"][split] = {
            "name": split,
            "num_samples": len(part),
            "filenames": names,
            "shard_lengths": [per_shard] * len(names),
        }
    (root / "info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def gnu_set(tmp_path_factory, digits) -> Path:
    """Tars GNU tar wrote from folders of key.jpg + key.cls (keys `./NAME`; --sort=name keeps a sample's files
    together, as webdataset needs), in train/ and val/ sub-folders; read-only."""
    base = tmp_path_factory.mktemp("gnu")
    root = base / "src"
    parts = {"train/a.tar": digits[:32], "train/b.tar": digits[32:64], "val/a.tar": digits[64:80]}
    for rel, part in parts.items():
        folder = base / "files" / rel
        folder.mkdir(parents=True)
        for synset, name, data in part:
            key = name.split(".")[0]
            (folder / f"{key}.jpg").write_bytes(data)
            (folder / f"{key}.cls").write_text(str(SYNSETS.index(synset)))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "--sort=name", "-C", str(folder), "-cf", str(root / rel), "."], check=True)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    yield root
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755)


def can_be_read_only() -> bool:
    """Whether this user is refused writing a read-only folder (root is not)."""
    return os.geteuid() != 0


def png_webp_samples(digits) -> list[list[tuple[str, bytes, bytes]]]:
    """Three shards of (member name, data) lists: keys in folders with dots, png/webp/jpg images, and in shard 0
    a jpg that is no image and a sample without a cls."""
    shards = []
    for s in range(3):
        members = []
        for i, (synset, _name, data) in enumerate(digits[s * 10 : s * 10 + 10]):
            key = f"set.v2/class {s}/img_{i:03d}".replace(" ", "_")
            fmt = ("PNG", "WEBP", "JPEG")[i % 3]
            if fmt != "JPEG":
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
                data = buf.getvalue()
            if (s, i) == (0, 4):
                data, fmt = b"not an image at all", "JPEG"
            ext = {"PNG": "png", "WEBP": "webp", "JPEG": "jpg"}[fmt]
            members.append((f"{key}.{ext}", data))
            if (s, i) != (0, 7):
                members.append((f"{key}.cls", str(SYNSETS.index(synset)).encode()))
        shards.append(members)
    return shards


@pytest.fixture(scope="module")
def tarfile_set(tmp_path_factory, digits) -> Path:
    """Python's tarfile: folders (and dots) in keys, png/webp/jpg, a corrupt jpg, a sample without cls, and the
    last of three shards truncated in the middle of its 6th member."""
    root = tmp_path_factory.mktemp("pytar") / "src"
    root.mkdir()
    for s, members in enumerate(png_webp_samples(digits)):
        path = root / f"part-{s}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if s == 2:
            with tarfile.open(path) as tar:
                sixth = tar.getmembers()[5]
            path.write_bytes(path.read_bytes()[: sixth.offset_data + sixth.size // 2])
    return root


def test_a_shardwriter_set_in_timms_layout_indexes_in_place_and_reruns_byte_identical(timm_set, layout, tmp_path):
    before = tree(timm_set)
    out = tmp_path / "index"
    first = index(timm_set, "--out", out, "--labels", layout)
    assert first["shards_indexed"] == 3 and first["bad_samples"] == 0 and "manifest" in first
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "swin-pipeline-shards/2" and manifest["shards_root"] == str(timm_set)
    assert manifest["source"]["shards_named_by"] == "info.json"
    assert [e["name"] for e in manifest["shards"]] == [
        "digits-train-0000.tar",
        "digits-train-0001.tar",
        "digits-validation-0000.tar",
    ]
    for e in manifest["shards"]:
        data = (timm_set / e["name"]).read_bytes()
        assert (e["bytes"], e["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest["totals"]["train"]["samples"] == 50 and manifest["totals"]["validation"]["samples"] == 20
    assert manifest["label_check"]["checked"] == 70 and manifest["label_check"]["mismatched"] == 1
    assert manifest["samples_differing_from_info"] == [] and manifest["rejected"] == []
    assert (out / "synsets.txt").read_text().split() == SYNSETS
    # the labels are the cls values, and the keys webdataset's, in the source's order
    train = open_shard_set(str(out), "train")
    assert train.data_url == str(timm_set)
    ds = wds.WebDataset([str(timm_set / e["name"]) for e in manifest["shards"][:2]], shardshuffle=False)
    read = [(s["__key__"], int(s["cls"])) for s in ds]
    assert read == [(train.table.key(r), int(train.table.label[r])) for r in range(len(train.table))]
    # a rerun skips every shard and changes no byte; the source is untouched
    everything = tree(out)
    again = index(timm_set, "--out", out, "--labels", layout)
    assert again["shards_indexed"] == 0 and again["shards_skipped"] == 3
    assert tree(out) == everything and tree(timm_set) == before
    # verify re-indexes the source and finds the index whole; a changed labels file is named
    report = verify(str(out))
    assert report.ok and (report.shards, report.samples) == (3, 70), report.problems
    labels = out / "train" / "shard-000001.labels.npy"
    labels.write_bytes(labels.read_bytes()[:-4] + b"\x07\x00\x00\x00")
    assert verify(str(out)).problems == [
        f"{out}/train/shard-000001.labels.npy: differs from what indexing the source gives now"
    ]


def test_slurm_array_tasks_share_the_shards_and_the_last_one_finalizes(timm_set, layout, tmp_path, monkeypatch):
    alone, split = tmp_path / "alone", tmp_path / "split"
    index(timm_set, "--out", alone, "--labels", layout, "--workers", 2)  # forked workers: the same bytes
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    first = index(timm_set, "--out", split, "--labels", layout)
    assert first["shards_indexed"] == 2 and "manifest" not in first and not (split / "manifest.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    second = index(timm_set, "--out", split, "--labels", layout)
    assert second["shards_indexed"] == 1 and "manifest" in second
    assert tree(split) == tree(alone)


def test_a_json_label_key_skips_and_counts_samples_outside_the_layout(timm_set, tmp_path):
    out = tmp_path / "by-json"
    summary = index(timm_set, "--out", out, "--set", "imagenet-12k-wds", "--label-key", "json:label_12k")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = open_shard_set(str(out), "train").table
    digits_under_5 = sum(
        1
        for s in wds.WebDataset(str(timm_set / "digits-train-{0000..0001}.tar"), shardshuffle=False)
        if int(s["cls"]) < 5
    )
    assert len(kept) == digits_under_5 and manifest["not_in_layout"]["train"] == 50 - digits_under_5
    assert (
        summary["not_in_layout"]
        == 70 - manifest["totals"]["train"]["samples"] - manifest["totals"]["validation"]["samples"]
    )
    assert manifest["label_layout"]["num_classes"] == 11821 and set(kept.label.tolist()) <= set(range(5))
    # timm's 12K layout does not hold the made-up digit synsets: the json check counts every checked label
    assert manifest["label_check"]["mismatched"] == manifest["label_check"]["checked"] > 0


def test_gnu_tar_sub_folders_from_a_read_only_source_index_elsewhere_and_train(gnu_set, layout, tmp_path):
    before = tree(gnu_set)
    # no --out: refused for a source on S3, or a local one this user cannot write (root writes any folder)
    for source, what in [("s3://bucket/imagenet-22k-wds", "on S3"), *([(gnu_set, "read-only")] * can_be_read_only())]:
        refused = run_prep("index", source, "--labels", layout, check=False)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: {source} is {what}: give --out, a folder or s3:// prefix for the index (the source is never "
            f"written)"
        )
    out = tmp_path / "index"
    summary = index(gnu_set, "--out", out, "--labels", layout)
    assert summary["samples"] == 80 and summary["bad_samples"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["totals"]) == ["train", "val"] and manifest["source"]["shards_named_by"] == "sub-folders"
    val = open_shard_set(str(out), "val")
    assert val.table.key(0).startswith("./n0000")  # GNU tar's `./` stays in the key, as webdataset keeps it
    runs = tmp_path / "runs"
    run([sys.executable, "-m", "pipeline.train", *small(out, runs, "indexed", "train.max_steps=3")])
    train_records, _ = metrics(runs / "indexed")
    assert [m["step"] for m in train_records][-1] == 3 and all(np.isfinite(m["loss"]) for m in train_records)
    assert tree(gnu_set) == before


def test_png_webp_keys_in_folders_a_corrupt_member_and_a_truncated_shard_are_counted(tarfile_set, layout, tmp_path):
    before = tree(tarfile_set)
    out = tmp_path / "index"
    args = ("index", tarfile_set, "--out", out, "--labels", layout, "--split", "train=part-{0..2}.tar")
    over = run_prep(*args, "--max-bad", "2", check=False)
    assert over.returncode == 2
    line = over.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 4 bad samples in 3 shards of ") and "over --max-bad 2" in line
    assert "part-0.tar/set.v2/class_0/img_004: unreadable jpg" in line
    still_over = run_prep("finalize", out, "--max-bad", "3", check=False)
    assert still_over.returncode == 2 and "4 bad samples" in still_over.stderr and not (out / "manifest.json").exists()
    summary = index(*args[1:], "--max-bad", "4")  # the done shards are kept: only the manifest is written now
    assert summary["shards_skipped"] == 3 and "manifest" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert manifest["bad_samples"] == 4 and sorted(reasons) == [
        "part-0.tar/set.v2/class_0/img_004",
        "part-0.tar/set.v2/class_0/img_007",
        "part-2.tar",
        "part-2.tar/set.v2/class_2/img_002",
    ]
    assert reasons["part-0.tar/set.v2/class_0/img_007"].startswith("no cls")
    assert reasons["part-2.tar"].startswith("truncated or unreadable tar")
    table = open_shard_set(str(out), "train").table
    assert len(table) == 8 + 10 + 2 == manifest["totals"]["train"]["samples"]
    idx = (out / "train" / "shard-000000.idx").read_text().splitlines()
    assert idx[1].startswith("png ") and idx[2].startswith("webp ") and "set.v2/class_0/img_000.png" in idx[1]
    assert tree(tarfile_set) == before


def test_index_help_names_its_options():
    shown = run_prep("index", "--help").stdout
    for option in ("--out", "--split", "--labels", "--set", "--label-key", "--max-bad", "--task-index"):
        assert option in shown
    assert "data.val_split=validation" in shown


@pytest.mark.s3
def test_a_set_on_s3_indexes_to_another_bucket_as_it_does_locally(s3_server, timm_set, layout, tmp_path, monkeypatch):
    """Source and index in two buckets, two workers streaming the shards: the same index files as a local run
    (the manifest differs only in where the source is), and the loaders' table reads the same from S3."""
    source_bucket, index_bucket = s3_server.create_bucket("wds"), s3_server.create_bucket("index")
    assert s3_server.upload_dir(timm_set, source_bucket, "imagenet-1k-wds") == 4
    source, out = f"s3://{source_bucket}/imagenet-1k-wds", f"s3://{index_bucket}/in1k"
    proc = run_prep("index", source, "--out", out, "--labels", layout, "--workers", 2, env=s3_server.subprocess_env())
    assert json.loads(proc.stdout)["shards_indexed"] == 3
    local = tmp_path / "local"
    index(timm_set, "--out", local, "--labels", layout)
    fetched = tmp_path / "fetched"
    s3_server.download_prefix(index_bucket, "in1k", fetched)
    on_s3, here = tree(fetched), tree(local)
    for name in ("manifest.json", "_prep/options.json"):
        assert on_s3.pop(name) != here.pop(name)
    assert on_s3 == here
    manifest, local_manifest = (json.loads((p / "manifest.json").read_text()) for p in (fetched, local))
    assert manifest.pop("shards_root") == source and manifest.pop("options")["source"] == source
    local_manifest.pop("shards_root"), local_manifest.pop("options")
    assert manifest == local_manifest
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.download_prefix(source_bucket, "", tmp_path / "after")  # nothing was written to the source bucket
    assert tree(tmp_path / "after") == {f"imagenet-1k-wds/{name}": digest for name, digest in tree(timm_set).items()}
    from_s3, from_disk = open_shard_set(out, "validation"), open_shard_set(str(local), "validation")
    assert from_s3.data_url == source and len(from_s3.table) == 20
    assert [from_s3.table.key(r) for r in range(20)] == [from_disk.table.key(r) for r in range(20)]


def test_dalis_own_webdataset_reader_reads_the_source_with_the_idx_files(tarfile_set, layout, tmp_path):
    """The `.idx` files are DALI's format: fn.readers.webdataset over the source tars reads exactly the samples
    kept (not the corrupt one, the one without cls, nor past the truncation), with their labels."""
    dali = pytest.importorskip("nvidia.dali")
    out = tmp_path / "index"
    index(tarfile_set, "--out", out, "--labels", layout, "--split", "train=part-{0..2}.tar", "--max-bad", "4")
    shards = json.loads((out / "manifest.json").read_text())["shards"]

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        return tuple(
            dali.fn.readers.webdataset(
                paths=[str(tarfile_set / e["name"]) for e in shards],
                index_paths=[str(out / e["index"]) for e in shards],
                ext=["jpg;png;webp", "cls"],
                missing_component_behavior="error",
            )
        )

    p = pipe()
    p.build()
    labels = []
    for _ in range(5):
        _images, cls = p.run()
        labels += [int(bytes(cls.at(i)).decode()) for i in range(len(cls))]
    table = open_shard_set(str(out), "train").table
    assert labels == table.label.tolist() and list(p.epoch_size().values()) == [20]
