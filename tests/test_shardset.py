"""pipeline.data.shard_checks: the cheap checks before a pipeline starts; pipeline.data.cache: S3 shards locally."""
import logging
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_prep
from data_prep.shardset.store import open_store
from pipeline.data.cache import CacheFullError, ShardCache
from pipeline.data.shard_checks import ShardSetError, open_shard_set


@pytest.fixture(scope="module")
def shard_set(digits_tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shardset") / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 300, "--holdout-per-class", 3)
    return out


@pytest.fixture
def copy(shard_set, tmp_path) -> Path:
    return Path(shutil.copytree(shard_set, tmp_path / "set"))


def test_a_good_set_opens_whole(shard_set):
    train = open_shard_set(str(shard_set), "train")
    assert train.num_samples == 1797 - 30 and len(train.shards) == 6 and not train.skipped
    assert train.num_classes == 10 and train.synsets[3] == "n00000003"
    assert open_shard_set(str(shard_set), "val").num_samples == 30


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_shard_is_left_out_within_the_budget(copy, caplog):
    cut(copy / "train/shard-000002.tar", 50_000)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
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


def test_an_index_pointing_past_the_end_is_caught(copy):
    # same size as the manifest says, but the index was written for another tar: DALI would read past the end
    idx = copy / "train/shard-000001.idx"
    lines = idx.read_text().splitlines()
    fields = lines[5].split(" ")
    fields[1] = str(10**9)
    lines[5] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    train = open_shard_set(str(copy), "train", max_bad_shards=3)
    assert train.skipped == [("train/shard-000001.tar",
                              f"index entry {fields[3]} ends at byte {10**9 + int(fields[2])}, past the tar's "
                              f"{(copy / 'train/shard-000001.tar').stat().st_size} bytes")]


@pytest.mark.parametrize("damage,reason", [
    (lambda idx: idx.unlink(), "its index file is missing"),
    (lambda idx: idx.write_text("\n".join(idx.read_text().splitlines()[:-1]) + "\n"), "index file unreadable"),
    (lambda idx: idx.write_text(idx.read_text().replace(" jpg ", " png ")), "lacks ['jpg']"),
])
def test_bad_index_files_are_caught(copy, damage, reason):
    damage(copy / "train/shard-000003.idx")
    train = open_shard_set(str(copy), "train", max_bad_shards=1)
    assert train.skipped[0][0] == "train/shard-000003.tar" and reason in train.skipped[0][1]


def test_a_shard_not_in_the_manifest_is_not_used(copy, caplog):
    shutil.copy(copy / "train/shard-000000.tar", copy / "train/shard-000077.tar")
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
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
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=[str(copy / s.index_name) for s in train.shards],
                                         ext=["jpg", "cls"], name="r")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.epoch_size("r") == train.num_samples
    for _ in range(train.num_samples // 100):
        p.run()


@pytest.mark.s3
def test_s3_shards_through_a_bounded_cache(s3_in_env, shard_set, tmp_path):
    s3_server = s3_in_env
    bucket = s3_server.create_bucket()
    s3_server.upload_dir(shard_set, bucket, "set")
    store = open_store(f"s3://{bucket}/set")
    train = open_shard_set(store.url, "train")
    assert train.num_samples == 1767 and len(train.shards) == 6
    biggest = max(s.bytes for s in train.shards)
    cache = ShardCache(tmp_path / "cache", max_bytes=2 * biggest + 10)  # room for two shards

    first_tar, first_idx = cache.paths(store, train.shards[0])
    assert first_tar.read_bytes() == (shard_set / train.shards[0].name).read_bytes()
    assert first_idx.read_bytes() == (shard_set / train.shards[0].index_name).read_bytes()
    held = os.open(first_tar, os.O_RDONLY)  # a reader holding the shard open, as ShardReader does
    fetched = []
    for shard in train.shards[1:4]:
        tar, _ = cache.paths(store, shard)
        fetched.append(tar)
        assert tar.read_bytes() == (shard_set / shard.name).read_bytes()
        assert cache.cached_bytes() <= cache.max_bytes
    # least recently used go first: shards 0 and 1 made room for 2 and 3
    assert not first_tar.exists() and not fetched[0].exists() and fetched[1].exists() and fetched[2].exists()
    expected = (shard_set / train.shards[0].name).read_bytes()
    try:
        assert os.pread(held, len(expected), 0) == expected  # evicted while open: the reader still reads it
    finally:
        os.close(held)
    again, _ = cache.paths(store, train.shards[0])  # fetched again on its next use, evicting shard 2
    assert again.read_bytes() == expected and not fetched[1].exists() and cache.cached_bytes() <= cache.max_bytes
    with pytest.raises(CacheFullError, match="does not fit"):
        ShardCache(tmp_path / "small", max_bytes=biggest - 1).paths(store, max(train.shards, key=lambda s: s.bytes))
    local = open_store(str(shard_set))  # a local set is read in place
    assert cache.paths(local, train.shards[0])[0] == shard_set / train.shards[0].name
