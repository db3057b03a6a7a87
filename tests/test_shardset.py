"""data_prep.shardset.reader: the cheap checks before a pipeline starts, the split index, the shards' own index
files when it is damaged, and the refusal of a set without one."""

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import damage_split_index, run_prep, without_split_indexes
from data_prep.shardset.reader import ShardSetError, open_shard_set
from servers import REPO

LOGGER = "data_prep.shardset.reader"


@pytest.fixture(scope="module")
def shard_set(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shardset") / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 300, "--holdout-per-class", 3)
    return out


@pytest.fixture
def copy(shard_set, tmp_path) -> Path:
    return Path(shutil.copytree(shard_set, tmp_path / "set"))


@pytest.fixture
def damaged_copy(copy) -> Path:
    """A copy read from its shards' own `.idx` files (its split index is damaged), so that they are checked."""
    return damage_split_index(copy)


def test_a_good_set_opens_whole(shard_set):
    train = open_shard_set(str(shard_set), "train")
    assert train.num_samples == 1797 - 30 and len(train.shards) == 6 and not train.skipped
    assert train.num_classes == 10 and train.synsets[3] == "n00000003"
    assert open_shard_set(str(shard_set), "val").num_samples == 30


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_shard_is_left_out_within_the_budget(copy, caplog):
    cut(copy / "train/shard-000002.tar", 50_000)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train = open_shard_set(str(copy), "train", max_bad_shards=1)
    assert [name for name, _ in train.skipped] == ["train/shard-000002.tar"]
    assert "50000 bytes, the manifest says" in train.skipped[0][1]
    assert len(train.shards) == 5 and train.num_samples == 1767 - 300
    assert "left out" in caplog.text and "train/shard-000002.tar" in caplog.text


def test_past_the_budget_the_error_names_the_shards_and_verify(copy):
    cut(copy / "train/shard-000002.tar", 50_000)
    (copy / "train/shard-000004.tar").unlink()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(str(copy), "train", max_bad_shards=1)
    text = str(err.value)
    assert "2 of 6 train shards" in text and "train/shard-000002.tar" in text
    assert "train/shard-000004.tar: missing from storage" in text
    assert f"python -m data_prep verify {copy}" in text


def test_an_index_pointing_past_the_end_is_caught(damaged_copy):
    # same size as the manifest says, but the index was written for another tar: DALI would read past the end
    copy = damaged_copy
    idx = copy / "train/shard-000001.idx"
    lines = idx.read_text().splitlines()
    fields = lines[5].split(" ")
    fields[1] = str(10**9)
    lines[5] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    train = open_shard_set(str(copy), "train", max_bad_shards=3)
    assert train.skipped == [
        (
            "train/shard-000001.tar",
            f"index entry {fields[3]} ends at byte {10**9 + int(fields[2])}, past the tar's "
            f"{(copy / 'train/shard-000001.tar').stat().st_size} bytes",
        )
    ]


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda idx: idx.unlink(), "its index file is missing"),
        (lambda idx: idx.write_text("\n".join(idx.read_text().splitlines()[:-1]) + "\n"), "index file unreadable"),
        (lambda idx: idx.write_text(idx.read_text().replace(" jpg ", " txt ")), "lacks an image (jpg|jpeg|png|webp)"),
    ],
)
def test_bad_index_files_are_caught(damaged_copy, damage, reason):
    damage(damaged_copy / "train/shard-000003.idx")
    train = open_shard_set(str(damaged_copy), "train", max_bad_shards=1)
    assert train.skipped[0][0] == "train/shard-000003.tar" and reason in train.skipped[0][1]


def count_reads(monkeypatch) -> list[str]:
    from data_prep.shardset.store import LocalStore

    reads, read = [], LocalStore.read
    monkeypatch.setattr(LocalStore, "read", lambda self, rel, *a, **k: reads.append(rel) or read(self, rel, *a, **k))
    return reads


def test_one_split_index_read_instead_of_one_per_shard(copy, monkeypatch):
    reads = count_reads(monkeypatch)
    split = open_shard_set(str(copy), "train")
    assert reads == ["manifest.json", "train/index.npz"]
    reads.clear()
    per_shard = open_shard_set(str(damage_split_index(copy)), "train")  # the shards' own .idx files instead
    assert reads[:2] == ["manifest.json", "train/index.npz"]
    assert sorted(reads[2:]) == [s.index_name for s in per_shard.shards]
    assert split.shards == per_shard.shards and split.table.names == per_shard.table.names
    for column in ("starts", "jpg_offset", "jpg_size", "cls_offset", "cls_size", "key_blob", "key_starts"):
        assert (getattr(split.table, column) == getattr(per_shard.table, column)).all(), column
    assert split.table.key(0) == per_shard.table.key(0) and len(split.table) == split.num_samples == 1767


def test_a_set_without_split_indexes_is_refused_until_finalize_writes_them(shard_set, copy, monkeypatch):
    bare = without_split_indexes(copy)
    reads = count_reads(monkeypatch)
    with pytest.raises(ShardSetError) as err:
        open_shard_set(str(bare), "val")
    assert str(err.value) == (
        f"{bare} has no split index for its 'val' shards (no `split_indexes` entry in its "
        f"manifest.json): `python -m data_prep finalize {bare}` writes it"
    )
    assert reads == ["manifest.json"]  # refused before any index file is read
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--check",
            "--config",
            str(REPO / "configs" / "tiny_22k.yaml"),
            f"data.shards={bare}",
            f"out_dir={bare.parent / 'runs'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )  # refused before any rank starts, too
    assert checked.returncode == 2 and checked.stderr.strip() == f"error: {err.value}".replace("'val'", "'train'")
    run_prep("finalize", bare)
    reads.clear()
    after = open_shard_set(str(bare), "train")
    assert reads == ["manifest.json", "train/index.npz"]
    before = open_shard_set(str(shard_set), "train")
    assert after.shards == before.shards and (after.table.jpg_offset == before.table.jpg_offset).all()


def test_the_split_index_is_in_the_manifest_with_its_sha256(shard_set):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    for split, entry in manifest["split_indexes"].items():
        data = (shard_set / entry["name"]).read_bytes()
        assert entry["name"] == f"{split}/index.npz" and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["samples"] == manifest["totals"][split]["samples"]


def test_a_damaged_split_index_falls_back_to_the_shard_indexes(copy, caplog):
    damage_split_index(copy)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train = open_shard_set(str(copy), "train")
    assert "train/index.npz does not match the sha256 in the manifest" in caplog.text
    assert "reading every shard's index file instead" in caplog.text
    assert train.num_samples == 1767 and not train.skipped


def test_a_split_index_pointing_past_the_end_is_caught(copy):
    import numpy as np

    from data_prep.shardset.split_index import SampleTable

    table = SampleTable.from_bytes((copy / "train/index.npz").read_bytes(), "train/index.npz")
    row = int(table.starts[1]) + 5  # shard 1, sample 5
    table.jpg_offset[row] = 10**9
    data = table.to_bytes()
    (copy / "train/index.npz").write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["split_indexes"]["train"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    train = open_shard_set(str(copy), "train", max_bad_shards=1)
    end = 10**9 + int(table.jpg_size[row])
    assert train.skipped == [
        (
            "train/shard-000001.tar",
            f"the split index points to byte {end}, past the tar's "
            f"{(copy / 'train/shard-000001.tar').stat().st_size} bytes",
        )
    ]
    assert np.array_equal(train.table.shard_sizes, [s.samples for s in train.shards])


def test_a_shard_not_in_the_manifest_is_not_used(copy, caplog):
    shutil.copy(copy / "train/shard-000000.tar", copy / "train/shard-000077.tar")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train = open_shard_set(str(copy), "train")
    assert "train/shard-000077.tar" not in {s.name for s in train.shards}
    assert "shard-000077.tar is not in the manifest" in caplog.text


def test_no_usable_shard_or_no_such_split_is_an_error(copy):
    with pytest.raises(ShardSetError, match="no 'test' shards"):
        open_shard_set(str(copy), "test")
    cut(copy / "val/shard-000000.tar", 1000)
    with pytest.raises(ShardSetError, match="1 of 1 val shards"):
        open_shard_set(str(copy), "val", max_bad_shards=5)


def test_dali_reads_what_the_checks_leave(copy):
    from nvidia.dali import fn, pipeline_def

    cut(copy / "train/shard-000002.tar", 50_000)  # DALI on this shard's index would read past the end
    train = open_shard_set(str(copy), "train", max_bad_shards=1)
    tars = [str(copy / s.name) for s in train.shards]

    @pipeline_def(batch_size=100, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars, index_paths=[str(copy / s.index_name) for s in train.shards], ext=["jpg", "cls"], name="r"
        )
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.epoch_size("r") == train.num_samples
    for _ in range(train.num_samples // 100):
        p.run()
