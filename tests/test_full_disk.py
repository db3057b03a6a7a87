"""A full disk during a save, on a real small file system: a 200 MB tmpfs made here holds the run folder, and a
filler file takes all but 256 KB of it once the first checkpoint is complete. A refused save leaves no temporary
folder and keeps the older checkpoints; the run keeps training and saves again once space is back; refusals in a
row up to checkpoint.max_failed_saves end it with exit 74; a stop signal whose save is refused exits 73.

Three launches: two ranks recovering (the filler removed after the first refusal), then one rank each for the
two ends (they need no second rank: the ranks' agreement is the first launch's)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import LAUNCH, job_env, records, small
from servers import REPO

pytestmark = pytest.mark.slow
EXIT_SAVES_FAILING, EXIT_STOP_NOT_SAVED = 74, 73
LEAVE = 256 << 10  # what the filler leaves: room for the records, not for a checkpoint (~35 MB here)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """A file taking all but LEAVE bytes of the disk."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - LEAVE)
    return filler


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            list(map(str, cmd)), cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 300):
    end = time.time() + timeout
    while not (found := what()):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first:\n{log.read_text()[-5000:]}"
        assert time.time() < end, f"not seen after {timeout} s:\n{log.read_text()[-5000:]}"
        time.sleep(0.01)
    return found


def failures(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "checkpoint_failed" in r]


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def full_disk(shards, small_disk, tmp_path_factory):
    """recover: 2 ranks, a checkpoint every 2 steps to step 14, the disk filled once step 2 is saved and freed
    after the first refusal; stop_saving: 1 rank, max_failed_saves=2, the disk left full; stopped: 1 rank, the
    disk full, SIGTERM after the first refusal. Each: its exit status, records, and the checkpoints folder as it
    was at the first refusal."""
    logs, out = tmp_path_factory.mktemp("full-disk-logs"), {}
    one_rank = [sys.executable, "-m", "pipeline.train"]
    scenarios = {
        "recover": (["bash", LAUNCH], ("train.max_steps=14",)),
        "stop_saving": (one_rank, ("train.max_steps=60", "checkpoint.max_failed_saves=2")),
        "stopped": (one_rank, ("train.max_steps=60", "checkpoint.max_failed_saves=5")),
    }
    for name, (launcher, extra) in scenarios.items():
        run_dir, log = small_disk / name, logs / f"{name}.log"
        cmd = [
            *launcher,
            *small(shards, small_disk, name, "checkpoint.every_steps=2", "checkpoint.keep_last=2", *extra),
        ]
        proc = start(cmd, log)
        try:
            saved = run_dir / "checkpoints" / "step_00000002" / "COMPLETE"
            wait_for(saved.is_file, proc, log)
            filler = fill(small_disk)
            first = wait_for(lambda folder=run_dir: failures(folder), proc, log)[0]
            at_failure = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
            if name == "recover":
                filler.unlink()
            elif name == "stopped":
                proc.send_signal(signal.SIGTERM)
            rc = finish(proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        filler.unlink(missing_ok=True)
        out[name] = {"rc": rc, "first": first, "at_failure": at_failure, "records": records(run_dir), "log": log}
        out[name]["after"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        shutil.rmtree(run_dir)  # room for the next
    return out


def test_a_refused_save_leaves_nothing_keeps_the_older_and_training_goes_on(full_disk):
    recover = full_disk["recover"]
    assert recover["rc"] == 0, recover["log"].read_text()[-5000:]
    first = recover["first"]
    assert first["free_bytes"] < 1 << 20 and first["checkpoint_failed"].endswith(f"step_{first['step']:08d}")
    assert "step_00000002" in recover["at_failure"]
    assert not [n for n in recover["at_failure"] if n.startswith(".tmp-")]
    steps = [r["step"] for r in recover["records"] if "loss" in r]
    assert steps == list(range(1, 15))  # every step once: no rank stopped or restarted
    saved_after = [n for n in recover["after"] if n.startswith("step_") and int(n[5:]) > first["step"]]
    assert "step_00000014" in saved_after  # tried again at the next interval, and saved


def test_max_failed_saves_in_a_row_stop_the_run_with_exit_74(full_disk):
    stopped = full_disk["stop_saving"]
    assert stopped["rc"] == EXIT_SAVES_FAILING, stopped["log"].read_text()[-5000:]
    failed = [r for r in stopped["records"] if "checkpoint_failed" in r]
    assert [r["failed_saves"] for r in failed] == [1, 2]
    assert [n for n in stopped["after"] if n.startswith(("step_", ".tmp-"))] == ["step_00000002"]


def test_a_stop_whose_save_is_refused_exits_73_naming_the_step_lost(full_disk):
    stopped = full_disk["stopped"]
    assert stopped["rc"] == EXIT_STOP_NOT_SAVED, stopped["log"].read_text()[-5000:]
    last_step = max(r["step"] for r in stopped["records"] if "loss" in r)
    assert stopped["records"][-1]["checkpoint_failed"].endswith(f"step_{last_step:08d}")
    errors = [line for line in stopped["log"].read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"step {last_step} is lost" in errors[0]
    assert [n for n in stopped["after"] if n.startswith(("step_", ".tmp-"))] == ["step_00000002"]
