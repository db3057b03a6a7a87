"""pipeline.data.cache and .readahead against the real S3 server: one budget per node shared by ranks and their
DataLoader workers, pins that keep a shard in use, a kill -9 in the middle of a download, read-ahead."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import damage_split_index, run_prep, without_split_indexes
from data_prep.shardset.reader import ShardSetError, open_shard_set
from data_prep.shardset.store import open_store
from pipeline.data.cache import CacheFullError, ShardCache
from pipeline.data.loader import LoaderConfig
from pipeline.data.order import epoch_order
from pipeline.data.readahead import ReadAhead
from pipeline.data.reader import ShardReader
from servers import REPO, latency_proxy

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def set18(digits_tars, tmp_path_factory) -> Path:
    """18 train shards of 100 images (about 420 kB each)."""
    out = tmp_path_factory.mktemp("cache") / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 100, "--holdout-per-class", 3)
    return out


@pytest.fixture
def on_s3(s3_in_env, set18) -> str:
    bucket = s3_in_env.create_bucket()
    s3_in_env.upload_dir(set18, bucket, "set")
    return f"s3://{bucket}/set"


def test_a_bounded_cache_evicts_least_recently_used_copies_never_one_in_use(on_s3, set18, tmp_path, caplog):
    store, train = open_store(on_s3), open_shard_set(on_s3, "train")
    s = train.shards
    assert len(s) == 18
    cache = ShardCache(tmp_path / "cache", max_bytes=s[0].bytes + max(x.bytes for x in s[1:5]) + 10)
    held = cache.acquire(store, s[0].name, s[0].bytes)  # in use by a reader all along
    assert held.path.read_bytes() == (set18 / s[0].name).read_bytes()
    paths = []
    for shard in s[1:4]:
        with cache.pinned(store, shard.name, shard.bytes) as path:
            assert path.read_bytes() == (set18 / shard.name).read_bytes()
            paths.append(path)
        assert cache.cached_bytes() <= cache.max_bytes
    # room for one more beside the pinned shard 0: 1 made room for 2, 2 for 3
    assert held.path.exists() and not paths[0].exists() and not paths[1].exists() and paths[2].exists()

    second = cache.acquire(store, s[3].name, s[3].bytes)  # two in use now, the budget is full
    assert cache.acquire(store, s[4].name, s[4].bytes, overshoot=False) is None  # read-ahead waits for room
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        third = cache.acquire(store, s[4].name, s[4].bytes)  # a reader that needs it now goes over, warned
        fourth = cache.acquire(store, s[5].name, s[5].bytes)
    assert len([r for r in caplog.records if "over its budget" in r.getMessage()]) == 1
    assert cache.cached_bytes() > cache.max_bytes
    for pin, shard in ((held, s[0]), (second, s[3]), (third, s[4]), (fourth, s[5])):
        assert os.pread(pin.fd, shard.bytes, 0) == (set18 / shard.name).read_bytes()
        pin.close()
    with cache.pinned(store, s[6].name, s[6].bytes):  # nothing in use: back under the budget
        assert cache.cached_bytes() <= cache.max_bytes

    with pytest.raises(CacheFullError, match="does not fit"):
        ShardCache(tmp_path / "small", max_bytes=s[0].bytes - 1).acquire(store, s[0].name, s[0].bytes)
    local = open_store(str(set18))  # a local set is read in place
    with cache.pinned(local, s[0].name, s[0].bytes) as path:
        assert path == set18 / s[0].name


RANK = """
import hashlib, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(process)d %(message)s")
from pipeline.data.loader import LoaderConfig, create_loader
url, local, cache_dir, budget, rank, world, workers = sys.argv[1:8]

def digest(cfg):
    h, n = hashlib.sha256(), 0
    for x, y in create_loader(cfg, rank=int(rank), world=int(world)):
        h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes()); n += 1
    return n, h.hexdigest()

base = dict(batch_size=16, image_size=32, backend="torch", shuffle_window=300)
remote = digest(LoaderConfig(shards=url, cache_dir=cache_dir, cache_bytes=int(budget), workers=int(workers), **base))
print("RESULT", remote[0], remote == digest(LoaderConfig(shards=local, workers=0, **base)), flush=True)
"""


def start_rank(url, local, cache_dir, budget, rank, world, workers, env):
    return subprocess.Popen(
        [sys.executable, "-c", RANK, url, str(local), str(cache_dir), str(budget), str(rank), str(world), str(workers)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def test_three_ranks_with_two_workers_each_share_a_budget_of_two_shards(on_s3, set18, s3_in_env, tmp_path):
    """The case that failed with FileNotFoundError when each process thought it owned the whole budget."""
    biggest = max(p.stat().st_size for p in set18.glob("train/*.tar"))
    budget, cache_dir = 2 * biggest, tmp_path / "cache"
    env = s3_in_env.subprocess_env()
    procs = [start_rank(on_s3, set18, cache_dir, budget, r, 3, 2, env) for r in range(3)]
    results = [finish(p) for p in procs]
    for out, err in results:
        assert re.search(r"RESULT \d+ True", out), out + err[-2000:]  # every batch equals the local set's
        assert "FileNotFoundError" not in err and "Traceback" not in err
    warnings = Counter(
        line.split()[0] for _out, err in results for line in err.splitlines() if "over its budget" in line
    )
    assert warnings and max(warnings.values()) == 1  # the ranks' shards in use overshoot: one warning a process
    assert not list(cache_dir.rglob(".*.part"))


def test_a_rank_killed_while_it_downloads_leaves_the_cache_usable(on_s3, set18, s3_in_env, tmp_path):
    cache_dir = tmp_path / "cache"
    biggest = max(p.stat().st_size for p in set18.glob("train/*.tar"))
    with latency_proxy(s3_in_env.endpoint_url, delay_ms=20, rate="200KB") as slow:  # ~2 s a shard
        env = s3_in_env.subprocess_env(AWS_ENDPOINT_URL=slow, AWS_ENDPOINT_URL_S3=slow)
        victim = start_rank(on_s3, set18, cache_dir, 4 * biggest, 0, 2, 0, env)
        other = start_rank(on_s3, set18, cache_dir, 4 * biggest, 1, 2, 0, env)
        deadline = time.time() + 120
        while not list(cache_dir.rglob(".*.part")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(cache_dir.rglob(".*.part")), "no download started"
        time.sleep(0.5)  # well inside a ~2 s download
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        out, _err = finish(other)  # the other rank reads its epoch through the same cache
        assert re.search(r"RESULT \d+ True", out)
    rerun = start_rank(on_s3, set18, cache_dir, 4 * biggest, 0, 2, 0, s3_in_env.subprocess_env())
    out, _err = finish(rerun)  # the killed rank again: its stale downloads are taken over or deleted
    assert re.search(r"RESULT \d+ True", out)
    assert not list(cache_dir.rglob(".*.part"))


def test_read_ahead_pins_the_next_shards_within_the_budget(on_s3, set18, tmp_path):
    train = open_shard_set(on_s3, "train")
    biggest = max(s.bytes for s in train.shards)

    def read_ahead(budget: int, ahead: int):
        cfg = LoaderConfig(shards=on_s3, batch_size=16, shuffle_window=0)
        reader = ShardReader(train, ShardCache(tmp_path / f"cache-{budget}", budget))
        order = epoch_order(reader.sizes, 0, 0, 0, 1, cfg.shuffle_window, shuffle=True, batch=16)
        return ReadAhead(reader, order, cfg.batch_size, ahead), reader

    def settled(ra, want: int):
        deadline = time.time() + 60
        while len(ra.pins) < want and time.time() < deadline:
            time.sleep(0.02)
        return list(ra.pins)

    ra, reader = read_ahead(10 * biggest, ahead=3)
    try:
        # no shuffle window: the shard read at batch 0, then the next three this rank reads, fetched
        assert settled(ra, 4) == ra.sequence[:4]
        time.sleep(0.3)
        assert len(ra.pins) == 4
        first_done = ra.last[ra.sequence[0]]
        ra.advance(first_done + 1)  # the reads are past the first shard: it goes at once, the fifth comes
        assert ra.sequence[0] not in ra.pins
        ra.advance(first_done)  # the loader, behind DALI's feeder, says where it is: the furthest position holds
        assert ra.position == first_done + 1
        deadline = time.time() + 60
        while ra.sequence[4] not in ra.pins and time.time() < deadline:
            time.sleep(0.02)
        assert sorted(ra.pins) == sorted(ra.sequence[1:5])
        # the reader finds them in the cache: no download on its own thread
        before = reader.cache.cached_bytes()
        reader.read(ra.sequence[1], 0)
        assert reader.cache.cached_bytes() == before
    finally:
        ra.close()
        reader.close()
    ra, reader = read_ahead(2 * biggest + 10, ahead=4)  # room for two: read-ahead never goes over
    try:
        assert len(settled(ra, 2)) == 2
        time.sleep(0.5)
        assert len(ra.pins) == 2 and ra.error is None
        assert reader.cache.cached_bytes() <= reader.cache.max_bytes
    finally:
        ra.close()
        reader.close()


def test_a_set_without_split_indexes_on_s3_is_refused_naming_finalize(set18, s3_in_env, tmp_path):
    """One line naming the set and the command that writes its split indexes; after it the set opens."""
    bare = without_split_indexes(Path(shutil.copytree(set18, tmp_path / "bare")))
    bucket = s3_in_env.create_bucket()
    s3_in_env.upload_dir(bare, bucket, "set")
    url = f"s3://{bucket}/set"
    with pytest.raises(ShardSetError) as err:
        open_shard_set(url, "train")
    assert str(err.value) == (
        f"{url} has no split index for its 'train' shards (no `split_indexes` entry in its "
        f"manifest.json): `python -m data_prep finalize {url}` writes it"
    )
    run_prep("finalize", url, env=s3_in_env.subprocess_env())
    assert open_shard_set(url, "train").num_samples == open_shard_set(str(set18), "train").num_samples


def test_a_damaged_split_index_on_s3_loads_from_the_shard_indexes(on_s3, set18, s3_in_env, tmp_path, caplog):
    """A split index that does not match the manifest, on S3: every .idx is read instead (warned), and a rank reads
    the same samples."""
    damaged = damage_split_index(Path(shutil.copytree(set18, tmp_path / "damaged")))
    bucket = s3_in_env.create_bucket()
    s3_in_env.upload_dir(damaged, bucket, "set")
    with caplog.at_level(logging.WARNING):
        per_shard = open_shard_set(f"s3://{bucket}/set", "train")
    assert "reading every shard's index file instead" in caplog.text and "left out" not in caplog.text
    split = open_shard_set(on_s3, "train")
    assert per_shard.shards == split.shards
    assert len(per_shard.table) == len(split.table) == sum(s.samples for s in split.shards) > 1700
    budget = 4 * max(s.bytes for s in split.shards)
    per_shard_reader = ShardReader(per_shard, ShardCache(tmp_path / "cache-per-shard", budget))
    split_reader = ShardReader(split, ShardCache(tmp_path / "cache-split", budget))
    try:
        for shard in range(len(per_shard.shards)):
            for sample in (0, per_shard.shards[shard].samples - 1):
                assert per_shard_reader.key(shard, sample) == split_reader.key(shard, sample)
                assert per_shard_reader.read(shard, sample) == split_reader.read(shard, sample)
    finally:
        per_shard_reader.close()
        split_reader.close()
