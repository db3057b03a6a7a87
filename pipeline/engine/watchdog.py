"""A stuck or dead rank ends the job, naming it.

Each rank writes a heartbeat, `<run>/ranks/rank_NNNNN.json` (rank, host, the address its node was reached at,
pid, the step it is at, the time), from a thread every HEARTBEAT_S seconds: a rank that is stopped (SIGSTOP, a
hung host), swapped out or dead stops writing it. Beside each rank runs a small watchdog process (this module's
main; no torch), which the rank tells through a pipe when it ends cleanly:

- the rank ends without saying so (a crash, kill -9, NCCL's watchdog aborting it, an error exit): the watchdog
  writes `<run>/ranks/rank_NNNNN.lost` and `<run>/ranks/ABORT`: the job is over;
- ABORT appears (another rank ended): the watchdog gives its rank ABORT_GRACE_S to end on its own (longer,
  EXITING_GRACE_S, when the rank said it is reporting an error of its own), then SIGKILLs it, which also ends a
  stopped process. Its launcher, seeing it gone, stops the node's other ranks, so
  no process is left behind on any node.

When a collective fails on a rank that is alive (gloo's timeout after train.collective_timeout_s, or its peer's
connection closing), `lost_rank_error` names the rank that stopped answering from those files: one that is gone
(its `.lost` marker), else the one whose heartbeat is oldest, else the one furthest behind.
Before the process group forms, each rank writes a start record (`ranks/start/rank_NNNNN.json`): when rank 0's
rendezvous times out, `start_failure` names the ranks that never started (their node's launcher failed).
Files on the run folder, which every rank sees anyway (the checkpoints need it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HEARTBEAT_S = 5.0
ABORT_GRACE_S = 10.0
EXITING_GRACE_S = 120.0  # for a rank that said it is reporting an error (note_exiting)
ABORT = "ABORT"


def ranks_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "ranks"


def node_address() -> str:
    """The address this node was reached at, as its launcher knows it.

    The address this node was reached at, as the launcher knows it: ssh's (pdsh), Slurm's node name, else the
    host name."""
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) == 4:
        return ssh[2]
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class RankWatch:
    """The rank's side: the heartbeat thread, the watchdog process, and `done()` on a clean end."""

    def __init__(self, run_dir: Path, rank: int):
        self.dir, self.rank = ranks_dir(run_dir), rank
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step = 0  # the loop sets it; the heartbeat reports it
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        self._child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.engine.watchdog", str(os.getpid()), str(rank), str(self.dir)],
            stdin=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parents[2]),
            start_new_session=True,
        )

    def _beat(self) -> None:
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "address": node_address(),
            "pid": os.getpid(),
            "step": self.step,
            "time": time.time(),
        }
        path = self.dir / f"rank_{self.rank:05d}.json"
        staged = path.with_name(path.name + ".tmp")
        staged.write_text(json.dumps(record))
        os.replace(staged, path)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError:
                pass  # a full or vanished disk ends the run elsewhere, with its own error

    def done(self) -> None:
        """A clean end (finished, stopped at a checkpoint): the watchdog leaves without a word."""
        self._stop.set()
        stdin = self._child.stdin
        assert stdin is not None  # Popen(stdin=PIPE)
        try:
            stdin.write(b"done\n")
            stdin.close()
            self._child.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass


_watch: RankWatch | None = None


def note_start(run_dir: Path, env: dict[str, str]) -> float:
    """Writes this rank's start record before the process group forms; the time it was written.

    Before the process group: this rank's start record, `<run>/ranks/start/rank_NNNNN.json`, so that a
    rank that never starts can be named (start_failure). Returns the time it was written."""
    from pipeline.engine.distributed import rank_environment

    ranks = rank_environment(env)
    now = time.time()
    if int(ranks["WORLD_SIZE"]) > 1:
        folder = ranks_dir(run_dir) / "start"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank_{int(ranks['RANK']):05d}.json").write_text(
                json.dumps(
                    {
                        "rank": int(ranks["RANK"]),
                        "host": socket.gethostname(),
                        "address": node_address(),
                        "pid": os.getpid(),
                        "time": now,
                    }
                )
            )
        except OSError:
            pass  # an unwritable run folder is reported by the run itself, naming it
    return now


def start_failure(e: BaseException, run_dir: Path, env: dict[str, str], since: float, timeout_s: float):
    """The error naming the ranks that never started, when the process group did not form; else `e`.

    The process group did not form (its rendezvous timed out): the error naming the ranks that never
    started, from the start records written since `since` (less a margin for clocks); else `e` itself."""
    from pipeline.engine.distributed import rank_environment
    from swin_common.cli import CommandError

    world = int(rank_environment(env)["WORLD_SIZE"])
    if world < 2 or not is_collective_failure(e):
        return e
    started = set()
    for path in (ranks_dir(run_dir) / "start").glob("rank_*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("time", 0) >= since - 300:
            started.add(record["rank"])
    missing = [r for r in range(world) if r not in started]
    if not missing:
        return CommandError(
            f"every rank started but the process group did not form within "
            f"train.collective_timeout_s={timeout_s:g} s: can every node reach "
            f"MASTER_ADDR:MASTER_PORT ({env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')})?"
        )
    some = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
    return CommandError(
        f"rank(s) {some} of {world} never started (no start record from this job in "
        f"{ranks_dir(run_dir) / 'start'}; rank 0 waited train.collective_timeout_s={timeout_s:g} s "
        f"for them): their node's launcher could not start them; see that node's lines above (a "
        f"path, interpreter or virtualenv missing on that node?)"
    )


def start_watch(run_dir: Path, rank: int) -> RankWatch:
    """This rank's heartbeat and watchdog, started with the last job's rank records cleared.

    Every rank, once the process group runs: rank 0 clears what an earlier job left (its ABORT would stop this
    one), then each rank starts its heartbeat and watchdog."""
    from pipeline.engine.distributed import barrier

    global _watch
    if rank == 0:
        folder = ranks_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for old in [folder / ABORT, *folder.glob("rank_*")]:
            old.unlink(missing_ok=True)
    barrier()
    if rank == 0:  # every rank wrote its start record before the process group formed: they have served
        for old in (ranks_dir(run_dir) / "start").glob("rank_*.json"):
            old.unlink(missing_ok=True)
    _watch = RankWatch(run_dir, rank)
    return _watch


def note_exiting() -> None:
    """Tells this rank's watchdog to give it the longer grace: it is reporting an error.

    This rank is on its way out with an error (reporting it, ending the MLflow run): its watchdog, should
    ABORT appear meanwhile, gives it EXITING_GRACE_S instead of ABORT_GRACE_S. A stopped rank never says so."""
    if _watch is not None:
        try:
            (_watch.dir / f"rank_{_watch.rank:05d}.exiting").touch()
        except OSError:
            pass


def at_step(step: int) -> None:
    """The training loop's progress, for the heartbeat (an attribute write: nothing in the hot loop waits)."""
    if _watch is not None:
        _watch.step = step


def heartbeats(run_dir: Path) -> dict[int, dict]:
    out = {}
    for path in ranks_dir(run_dir).glob("rank_*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[record["rank"]] = record
    return out


def is_collective_failure(e: BaseException) -> bool:
    """An error of the process group's transport: gloo's or NCCL's timeout, a peer's connection closing."""
    names = {c.__name__ for c in type(e).__mro__}
    text = str(e)
    return bool(names & {"DistBackendError", "DistNetworkError", "DistStoreError"}) or (
        isinstance(e, RuntimeError) and ("/gloo/" in text or "NCCL" in text or "Connection closed by peer" in text)
    )


def lost_rank_error(
    run_dir: Path, me: int, world: int, timeout_s: float, cause: BaseException | None = None, settle_s: float = 3.0
) -> str:
    """The error line naming the rank that stopped answering.

    The line that names the rank that stopped answering (see the module's docstring); `cause`: the
    collective's own error, whose first line ends it."""
    deadline = time.time() + settle_s  # a dead rank's watchdog writes its marker within a second or so
    while True:
        lost = sorted(int(p.stem.split("_")[1]) for p in ranks_dir(run_dir).glob("rank_*.lost"))
        lost = [r for r in lost if r != me]
        if lost or time.time() > deadline:
            break
        time.sleep(0.2)
    beats = heartbeats(run_dir)
    missing = [r for r in range(world) if r not in beats and r != me]

    def who(r: int) -> str:
        b = beats.get(r)
        if b is None:
            return f"rank {r}"
        where = b["address"] if b["address"] == b["host"] else f"{b['host']} ({b['address']})"
        return f"rank {r} on {where}, pid {b['pid']}, last at step {b['step']}"

    if lost:
        what = f"{', '.join(who(r) for r in lost)}: its process ended (see that node's log for why)"
    elif missing:
        what = f"{', '.join(map(who, missing))}: never wrote a heartbeat"
    else:
        others = [r for r in beats if r != me]
        if not others:
            return f"a collective failed (train.collective_timeout_s={timeout_s:g})"
        now = time.time()
        oldest = min(others, key=lambda r: beats[r]["time"])
        if now - beats[oldest]["time"] > 2 * HEARTBEAT_S:
            what = f"{who(oldest)}: stopped answering (no heartbeat for over {2 * HEARTBEAT_S:.0f} s)"
        else:
            behind = min(others, key=lambda r: beats[r]["step"])
            what = f"{who(behind)}: furthest behind, still alive"
    why = ""
    if cause is not None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        why = f" (rank {me}'s collective: {first.split('] ', 1)[-1][:160]})"  # without gloo's source path
    return (
        f"{what}; the other ranks waited for it past train.collective_timeout_s={timeout_s:g} s or lost their "
        f"connection to it, and the job ends (every rank is stopped; rank heartbeats in {ranks_dir(run_dir)}). "
        f"Run the same command to resume from the newest checkpoint{why}"
    )


# -- the watchdog process ------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def watch(parent: int, rank: int, folder: Path) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # the rank decides; a launcher's SIGKILL ends us
        signal.signal(sig, signal.SIG_IGN)
    said = []

    def read_pipe():
        said.append(sys.stdin.buffer.read())  # EOF: the rank closed it, or is gone

    reader = threading.Thread(target=read_pipe, daemon=True)
    reader.start()
    while True:
        reader.join(1.0)
        if not reader.is_alive():
            if b"done" in said[0]:
                return 0
            (folder / f"rank_{rank:05d}.lost").write_text(
                json.dumps({"rank": rank, "pid": parent, "time": time.time()})
            )
            (folder / ABORT).write_text(f"rank {rank} ended\n")
            return 0
        if (folder / ABORT).exists():
            start = time.time()
            while _alive(parent) and reader.is_alive():
                exiting = (folder / f"rank_{rank:05d}.exiting").exists()
                if time.time() - start > (EXITING_GRACE_S if exiting else ABORT_GRACE_S):
                    break
                time.sleep(0.2)
            if _alive(parent) and reader.is_alive():
                try:
                    os.kill(parent, signal.SIGKILL)  # also ends a stopped process
                except ProcessLookupError:
                    pass
            return 0


if __name__ == "__main__":
    status = watch(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
    os._exit(status)  # not the interpreter's exit: the pipe's reader thread may still be blocked in its read
