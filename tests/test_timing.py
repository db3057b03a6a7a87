"""Every log line says where the time went, checked with real processes: a rank stopped (SIGSTOP) for 3 s is
named as the slowest by its own time, not by the wait every rank then shares; a shard set behind a slow S3
shows a data wait above a local set's; the run ends with its time split into compute, data, checkpoints and
evaluation."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.engine.timing import window_fields
from runs import LAUNCH, job_env, metrics, small
from servers import REPO, latency_proxy, rank_pid


def test_window_fields_name_the_slowest_rank_by_its_own_time():
    fields = window_fields([(0.5, 0.1), (3.4, 0.2), (0.6, 0.0)], steps=2, elapsed=4.0)
    assert fields["slowest_rank"] == 1 and fields["own_s_max"] == pytest.approx(1.7)
    assert fields["own_s_median"] == pytest.approx(0.3) and fields["step_s"] == pytest.approx(2.0)
    assert fields["data_wait_s"] == pytest.approx(0.1) and fields["data_wait_pct"] == pytest.approx(5.0)


def args(shards, out: Path, name: str, *extra: str) -> list[str]:
    return small(shards, out, name, "schedule.epochs=20", "checkpoint.every_steps=1000", *extra)


def step_records(run_dir: Path) -> list[dict]:
    return metrics(run_dir)[0]


def main_thread_running(pid: int) -> bool:
    """Its main thread is on a CPU (state R): computing, not asleep in a collective's receive."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"


def stall(victim: int, seconds: float) -> None:
    """SIGSTOP, then SIGCONT `seconds` later, once its main thread has been on a CPU for three looks 1 ms apart:
    likely inside its forward or backward, though it may be the optimizer's step (its own work too, but after
    the collectives that the own time stops at)."""
    running = 0
    while running < 3:
        running = running + 1 if main_thread_running(victim) else 0
        time.sleep(0.001)
    os.kill(victim, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(victim, signal.SIGCONT)


@pytest.mark.slow
def test_a_rank_stopped_for_3_s_is_named_the_slowest_with_its_own_stall(shards, tmp_path):
    """A stall that lands in the optimizer's step shows in every rank's wait, not in an own time: the test
    stalls again (up to 5 times, a few steps apart) until one lands in the forward or backward."""
    run_dir, log = tmp_path / "stall", tmp_path / "stall.log"
    with open(log, "w") as out:  # a file, not a pipe that nobody reads while the run goes on
        proc = subprocess.Popen(
            ["bash", LAUNCH, *args(shards, tmp_path, "stall", "train.max_steps=60")],
            cwd=REPO,
            env=job_env(),
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
    stalled, tries = [], []
    try:
        end = time.time() + 300
        while len(step_records(run_dir)) < 8:
            assert proc.poll() is None and time.time() < end, log.read_text()[-4000:]
            time.sleep(0.05)
        victim = rank_pid(run_dir, 1)
        while not stalled and len(tries) < 5:
            stopped_after = step_records(run_dir)[-1]["step"]
            stall(victim, 3.0)
            while len([r for r in step_records(run_dir) if r["step"] > stopped_after]) < 3:
                assert proc.poll() is None and time.time() < end, log.read_text()[-4000:]
                time.sleep(0.05)
            after = [r for r in step_records(run_dir) if r["step"] > stopped_after][:2]
            tries.append(after)
            stalled = [r for r in after if r["own_s_max"] >= 3.0]
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert stalled, f"none of {len(tries)} stalls shows as a 3 s own time: {tries}"
    r = stalled[0]
    assert r["slowest_rank"] == 1, r
    assert r["step_s"] >= 3.0  # every rank waited for it...
    assert 2 * r["own_s_median"] - r["own_s_max"] < 1.0, r  # ... but rank 0's own time did not grow
    waited = {x["step"] for after in tries for x in after}
    others = [x for x in step_records(run_dir) if x["step"] not in waited and x["step"] > 3]
    assert statistics.median(x["own_s_max"] for x in others) < 1.0
    assert "time: " in err and "training = compute" in err and "data wait" in err, err[-3000:]


@pytest.mark.slow
def test_a_shard_set_behind_a_slow_s3_shows_a_longer_data_wait(shards, s3_server, tmp_path):
    """One rank, no read-ahead, in-process decoding: every shard it opens comes through a proxy that delays each
    S3 request by 300 ms, against the same set on local disk."""
    bucket = s3_server.create_bucket("timing")
    s3_server.upload_dir(shards, bucket, "digits")

    def run(name: str, shard_url, run_env: dict, *extra: str) -> list[dict]:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                *args(
                    shard_url,
                    tmp_path,
                    name,
                    "train.max_steps=12",
                    "data.workers=0",
                    f"data.cache_dir={tmp_path / name / 'cache'}",
                    "data.val_split=",
                    *extra,
                ),
            ],
            cwd=REPO,
            env=run_env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        return step_records(tmp_path / name)

    local = run("local", shards, job_env(), "data.read_ahead=0")
    assert "cache_hits" not in local[-1]  # a local set is read in place: no cache fields
    with latency_proxy(s3_server.endpoint_url, delay_ms=300) as slow:
        s3_env = s3_server.subprocess_env(
            AWS_ENDPOINT_URL=slow,
            AWS_ENDPOINT_URL_S3=slow,
            PYTHON=sys.executable,
            **{k: v for k, v in job_env().items() if k == "MASTER_PORT"},
        )
        remote = run("s3", f"s3://{bucket}/digits", s3_env, "data.read_ahead=0")
        ahead = run("s3ahead", f"s3://{bucket}/digits", s3_env, "data.read_ahead=2")
    local_wait, remote_wait = [r["data_wait_s"] for r in local], [r["data_wait_s"] for r in remote]
    assert sum(remote_wait) > sum(local_wait) + 0.5, (remote_wait, local_wait)
    assert max(remote_wait) >= 0.3  # at least one batch waited for a shard's download
    # the node cache's counts: every shard opened once was downloaded (a miss), a reopened one found (a hit)
    assert sum(r["cache_misses"] for r in remote) >= 1 and all(r["read_ahead_depth"] == 0 for r in remote)
    assert max(r["read_ahead_depth"] for r in ahead) >= 1, [r["read_ahead_depth"] for r in ahead]
    assert sum(r["cache_hits"] for r in ahead) >= 1  # read ahead, then found by the reader
