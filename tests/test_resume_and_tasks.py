"""Crash safety and parallelism: kill -9 then rerun, and N independent tasks, both equal one clean run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_tree, run_prep
from data_prep.embedded import write_synset_tars

ARGS = ["--max-samples", 30, "--holdout-per-class", 4, "--seed", 7, "--resize-shorter", 48]


@pytest.fixture(scope="module")
def big_digits(tmp_path_factory) -> Path:
    # 256 px digits resized to 48 at prep: every image is re-encoded, so a run lasts long enough to be killed
    return write_synset_tars(tmp_path_factory.mktemp("big") / "tars", size=256)


@pytest.fixture(scope="module")
def reference(big_digits, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "set"
    run_prep("shard", "--source", big_digits, "--out", out, *ARGS)
    return read_tree(out)


def start_prep(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_bytes(big_digits, reference, tmp_path):
    out = tmp_path / "set"
    total = sum(1 for name in reference if name.endswith(".tar"))
    proc = start_prep("shard", "--source", big_digits, "--out", out, *ARGS, "--workers", 2)
    done_dir = out / "_prep" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(done_dir.glob("*.json"))) < 5:
        time.sleep(0.01)
    workers = children(proc.pid)
    assert workers, "the job should run worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    assert not [pid for pid in workers if alive(pid)], "workers outlived the killed job"
    finished = len(list(done_dir.glob("*.json")))
    assert 5 <= finished < total, f"the kill came too late to test anything ({finished} of {total} done)"
    assert not (out / "manifest.json").exists()

    rerun = run_prep("shard", "--source", big_digits, "--out", out, *ARGS, "--workers", 2)
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] >= 5 and summary["shards_written"] + summary["shards_skipped"] == total
    assert read_tree(out) == reference
    assert not list(out.rglob("*.tmp-*"))


@pytest.mark.slow
def test_array_tasks_as_separate_processes_equal_one_task(big_digits, reference, tmp_path):
    out = tmp_path / "set"

    def env(i: int) -> dict[str, str]:
        return {
            "SLURM_ARRAY_TASK_ID": str(10 + i),
            "SLURM_ARRAY_TASK_MIN": "10",
            "SLURM_ARRAY_TASK_MAX": "12",
            "SLURM_ARRAY_TASK_COUNT": "3",
        }

    procs = [start_prep("shard", "--source", big_digits, "--out", out, *ARGS, env=env(i)) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert read_tree(out) == reference


def test_finalize_waits_for_every_task(digits_tars, tmp_path):
    out = tmp_path / "set"
    common = ["--source", digits_tars, "--out", out, "--max-samples", 100]
    for i in (0, 1):
        run_prep("shard", *common, "--task-index", i, "--num-tasks", 3)
    assert not (out / "manifest.json").exists()
    early = run_prep("finalize", out, check=False)
    assert early.returncode == 2 and "not finished yet" in early.stderr and "shard-000002" in early.stderr
    last = run_prep("shard", *common, "--task-index", 2, "--num-tasks", 3)
    assert json.loads(last.stdout)["manifest"].endswith("manifest.json")
    manifest = (out / "manifest.json").read_bytes()
    run_prep("finalize", out)  # idempotent
    assert (out / "manifest.json").read_bytes() == manifest
    one = tmp_path / "one"
    run_prep("shard", "--source", digits_tars, "--out", one, "--max-samples", 100)
    assert read_tree(out) == read_tree(one)


def test_list_only_caches_the_listing_that_tasks_reuse(digits_tars, tmp_path):
    import shutil

    src, out = Path(shutil.copytree(digits_tars, tmp_path / "src")), tmp_path / "set"
    proc = run_prep("shard", "--source", src, "--out", out, "--list-only", "--max-samples", 100)
    summary = json.loads(proc.stdout)
    assert summary == {
        "images": 1797,
        "synsets": 10,
        "kind": "synset-tars",
        "rejected_while_listing": 0,
        "shards_planned": 18,
    }
    assert (out / "_prep/listing.npz").exists() and not (out / "train").exists()
    shutil.copy(src / "n00000001.tar", src / "n00000042.tar")  # arrives after the listing: not seen
    run_prep("shard", "--source", src, "--out", out, "--max-samples", 100)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_layout"]["num_classes"] == 10 and manifest["totals"]["train"]["samples"] == 1797


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, (0, 1)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "8",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            (4, 8),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "4",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            (2, 3),
        ),
    ],
)
def test_task_position_in_a_slurm_array(monkeypatch, env, expected):
    from data_prep.shard import slurm_task_defaults

    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert slurm_task_defaults() == expected


def test_a_slurm_array_of_listed_ids_is_refused(digits_tars, tmp_path):
    env = {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "7",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    proc = run_prep("shard", "--source", digits_tars, "--out", tmp_path / "o", env=env, check=False)
    assert proc.returncode == 2 and "must be a range" in proc.stderr


def test_the_same_source_spelt_differently_resumes(digits_tars, tmp_path):
    out = tmp_path / "set"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 500)
    rel = os.path.relpath(digits_tars, REPO)
    proc = run_prep("shard", "--source", rel + "/", "--out", out, "--max-samples", 500)
    assert json.loads(proc.stdout)["shards_written"] == 0


def test_a_rerun_removes_what_a_killed_run_left_half_written(digits_tars, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "set"
    run_prep("shard", "--source", digits_tars, "--out", ref, "--max-samples", 100)
    # what a kill -9 leaves when it lands while shard 0's tar, index and done-record are being written
    leftovers = [
        out / "train/.shard-000000.tar.tmp-4242",
        out / "train/.shard-000000.idx.tmp-4242",
        out / "_prep/done/.train-000000.json.tmp-4242",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 100)
    assert not [path for path in leftovers if path.exists()]
    assert read_tree(out) == read_tree(ref)


def test_a_failed_shard_is_logged_on_its_own_line_above_the_progress_bar(digits_tars, tmp_path):
    """A directory where shard 2's staging file goes (a real OSError, from the file system) fails that shard while
    the bar runs: the log line is its own line on a terminal (tqdm's \\r redraws never run into it), the other
    shards are written, and once the directory is gone the same command finishes the set."""
    import re

    out = tmp_path / "set"
    blocker = out / "train" / ".shard-000002.tar.tmp-1"
    blocker.mkdir(parents=True)
    proc = run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 300, check=False)
    assert proc.returncode == 2 and "shard train/shard-000002.tar failed" in proc.stderr, proc.stderr[-3000:]
    assert f"IsADirectoryError: [Errno 21] Is a directory: '{blocker}'" in proc.stderr.splitlines()[-1]  # the file
    assert "sharding:" in proc.stderr  # the bar was drawn
    shown = [line.rsplit("\r", 1)[-1] for line in proc.stderr.split("\n")]  # what a terminal keeps of each line
    logged = [line for line in shown if re.search(r" data_prep(\.\w+)* ", line)]  # its loggers: data_prep.*
    assert any(" ERROR shard train/shard-000002.tar failed" in line for line in logged)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in logged), logged
    blocker.rmdir()
    rerun = run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 300)
    assert json.loads(rerun.stdout)["shards_written"] == 1


def test_listing_skips_files_being_written_by_other_tasks(tmp_path):
    from data_prep.shardset.store import LocalStore

    (tmp_path / "_prep/done").mkdir(parents=True)
    (tmp_path / "_prep/done/train-000001.json").write_text("{}")
    (tmp_path / "_prep/done/.train-000002.json.tmp-4242").write_text("{")  # another task, mid-write
    assert [rel for rel, _ in LocalStore(tmp_path).list("_prep/done")] == ["_prep/done/train-000001.json"]
