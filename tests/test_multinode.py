"""Multi-node launches, for real on one machine: 127.0.0.1 and 127.0.0.2 are two ssh "nodes" (one throwaway
sshd, tests/servers.py::ssh_nodes) and the deepspeed launcher starts one rank on each over pdsh + ssh, as on a
cluster. Both habits (`HOSTFILE=... bash launch/pretrain_22k.sh` and `deepspeed --hostfile ...
launch/pretrain_22k.sh`) train the tiny recipe at world 2 into a shared run folder; the rank on 127.0.0.2 is
killed with -9 mid-run, the same command is run again, and it resumes from the newest complete checkpoint
and finishes. Also Slurm across two nodes (one slurmd per address, tests/servers.py::slurm_two_nodes) and
`accelerate launch`, one node and two, as more launchers of the same entry point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runs import (
    ACCELERATE,
    DEEPSPEED,
    LAUNCH,
    SBATCH,
    checkpoint_record,
    job_env,
    metrics,
    newest_complete,
    rank_records,
    sbatch_env,
)
from runs import small as small_run
from servers import REPO, free_port, start_sshd

pytestmark = pytest.mark.slow


def small(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A small run with the recipe named as a user types it, relative to the repository."""
    return small_run(shards, out, name, *extra, config="configs/tiny_22k.yaml")


# --- processes of one run, found by /proc ----------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


def run_processes(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the run's own folder): the launchers and the ranks
    on every node, whatever started them (the ranks on the ssh nodes are children of sshd, not of the test)."""
    me = os.getpid()
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and int(p.name) != me
        and any(marker in a for a in _cmdline(int(p.name)))
        and _alive(int(p.name))
    ]


def rank_process(marker: str, rank: int) -> int | None:
    """The training process of global rank `rank` (the one whose environment has RANK=rank)."""
    for pid in run_processes(marker):
        cmd = " ".join(_cmdline(pid))
        if ("-m pipeline.train" in cmd or "pretrain_22k.sh --local_rank" in cmd) and _environ(pid).get("RANK") == str(
            rank
        ):
            return pid
    return None


def kill_all(marker: str) -> list[int]:
    """SIGKILL, by PID, every process of the run still alive; returns them."""
    left = run_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def wait_gone(marker: str, timeout: float) -> list[int]:
    end = time.time() + timeout
    while (left := run_processes(marker)) and time.time() < end:
        time.sleep(0.2)
    return left


# --- ssh "nodes" -----------------------------------------------------------------------------------------
# settings the project reads, which the deepspeed runner alone would not pass to the other nodes
FORWARDED = {
    "SWIN_FORWARD_CHECK": "a b,c",
    "AWS_DEFAULT_REGION": "eu-west-3",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "DEEPSPEED_TIMEOUT": "12",
}


STEPS = 16  # killed after the step-4 checkpoint (at most step 8 is saved by then), resumed to the end


def world_and_batch(checkpoint: Path) -> tuple[int, int, int]:
    """The world size a checkpoint was saved at, and its global and micro batch (a rank's share of a step)."""
    meta = checkpoint_record(checkpoint)
    return meta["world_size"], meta["global_batch"], meta["micro_batch"]


@pytest.fixture(scope="module", params=["bash_hostfile", "deepspeed_hostfile"])
def killed_and_resumed(request, ssh_nodes, shards, tmp_path_factory):
    """One two-node run (rank 0 on 127.0.0.1, rank 1 on 127.0.0.2, a shared run folder), launched in one of two
    habits: `HOSTFILE=... bash launch/pretrain_22k.sh` from the user's own folder, or `deepspeed --hostfile ...
    launch/pretrain_22k.sh` in the repository as the team types it. Once its step-4 checkpoint is complete, the
    process of rank 1 is killed with -9; when the launch has ended, the same command is run again to the end.
    What each phase left, as it was when the phase ended."""
    form, tmp_path = request.param, tmp_path_factory.mktemp(request.param)
    run_dir = tmp_path / "shared" / "mn"  # the shared run folder: an absolute out_dir every node sees
    marker = str(run_dir.parent)
    hostfile = ssh_nodes.hostfile(tmp_path / "hostfile")
    args = small(
        shards, run_dir.parent, "mn", f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=3"
    )
    port = free_port()
    if form == "bash_hostfile":  # relative paths are the user's: run from a folder of the user's
        cmd = ["bash", LAUNCH, *args]
        env = job_env(
            port=False,
            **ssh_nodes.env,
            HOSTFILE=str(hostfile),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **FORWARDED,
        )
        cwd = tmp_path / "user"
        cwd.mkdir()
    else:  # the script's path and --config relative to the repository
        cmd = [
            DEEPSPEED,
            "--hostfile",
            hostfile,
            "--ssh_port",
            ssh_nodes.port,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "launch/pretrain_22k.sh",
            *args,
        ]
        env = job_env(port=False, PATH=ssh_nodes.env["PATH"])
        cwd = REPO
    cmd = list(map(str, cmd))
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    out = SimpleNamespace(form=form, run_dir=run_dir)
    try:
        with open(log1, "w") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ckpt = run_dir / "checkpoints" / "step_00000004" / "COMPLETE"
        end = time.time() + 240
        while not ckpt.exists():
            assert proc.poll() is None, (
                f"the run ended (exit {proc.returncode}) before {ckpt}:\n{log1.read_text()[-6000:]}"
            )
            assert time.time() < end, f"no {ckpt} after 240 s:\n{log1.read_text()[-6000:]}"
            time.sleep(0.01)
        victim = rank_process(marker, 1)
        assert victim is not None, f"no process with RANK=1 among {run_processes(marker)}"
        out.victim, out.victim_env = victim, _environ(victim)
        os.kill(victim, signal.SIGKILL)
        rank0 = rank_process(marker, 0)
        out.rank0_env = _environ(rank0) if rank0 is not None else {}
        try:
            out.first_rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within 120 s of the kill:\n{log1.read_text()[-6000:]}")
        out.first_log = log1.read_text()
        out.left_after_kill = [(p, _cmdline(p)) for p in wait_gone(marker, 60)]
        out.lost, out.first_heartbeats = rank_records(run_dir, "lost"), rank_records(run_dir, "json")
        out.newest = newest_complete(run_dir)
        out.newest_meta = checkpoint_record(out.newest)
        out.first_steps = len(metrics(run_dir)[0])

        with open(log2, "w") as log:
            out.second_rc = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400
            ).returncode
        out.second_log = log2.read_text()
        out.heartbeats = rank_records(run_dir, "json")
    finally:
        out.left_at_end = kill_all(marker)
    out.steps = metrics(run_dir)[0]
    return out


def test_two_nodes_start_one_rank_each_over_ssh(killed_and_resumed):
    """Rank 1 was started over ssh on the second node by the launcher there, one rank per node; rank 0 on the
    first, and their heartbeats say where they ran."""
    run = killed_and_resumed
    assert run.victim_env["SSH_CONNECTION"].split()[2] == "127.0.0.2", run.victim_env.get("SSH_CONNECTION")
    assert (run.victim_env["WORLD_SIZE"], run.victim_env["LOCAL_RANK"]) == ("2", "0")
    assert run.rank0_env["SSH_CONNECTION"].split()[2] == "127.0.0.1", run.rank0_env.get("SSH_CONNECTION")
    assert {r: b["address"] for r, b in run.first_heartbeats.items()} == {0: "127.0.0.1", 1: "127.0.0.2"}


def test_the_project_settings_reach_the_other_node(killed_and_resumed):
    """DeepSpeed's runner alone passes on only NCCL*, PYTHON*, MLFLOW*, ...: the launch script's DS_ENV_FILE
    (swin_common/launch_env.py) passes on the settings the project reads."""
    if killed_and_resumed.form != "bash_hostfile":
        pytest.skip("only the launch script is given the settings")
    victim_env = killed_and_resumed.victim_env
    assert {k: victim_env.get(k) for k in FORWARDED} == FORWARDED


def test_the_kill_9_of_the_remote_rank_fails_the_launch_and_is_recorded(killed_and_resumed):
    run = killed_and_resumed
    assert run.first_rc != 0, run.first_log[-4000:]
    assert run.lost[1]["pid"] == run.victim, run.lost  # its watchdog's record: rank 1's process ended


def test_rank_0_names_the_lost_rank_and_its_node(killed_and_resumed):
    """The error line a user reads (pipeline/engine/watchdog.py), from rank 0's node."""
    assert re.search(
        r"^127\.0\.0\.1: error: rank 1 on \S+ \(127\.0\.0\.2\), pid \d+, last at step \d+: its process ended",
        killed_and_resumed.first_log,
        re.M,
    ), killed_and_resumed.first_log[-4000:]


def test_the_output_of_both_nodes_reaches_the_launch(killed_and_resumed):
    """pdsh prefixes each node's lines with its address."""
    for run_log in (killed_and_resumed.first_log, killed_and_resumed.second_log):
        assert "127.0.0.1: " in run_log and "127.0.0.2: " in run_log, run_log[-3000:]


def test_no_process_of_the_killed_run_is_left_on_either_node(killed_and_resumed):
    """pdsh is gone; the ranks' own launchers on each node end them."""
    assert not killed_and_resumed.left_after_kill


def test_the_killed_run_had_checkpoints_but_not_its_end(killed_and_resumed):
    meta = killed_and_resumed.newest_meta
    assert 4 <= meta["step"] < STEPS, f"the run finished before the kill took effect ({killed_and_resumed.newest})"


def test_the_global_batch_is_16_micro_on_each_of_2_ranks(killed_and_resumed):
    meta = killed_and_resumed.newest_meta  # of the killed run's newest checkpoint (pruned by the end)
    assert (meta["world_size"], meta["global_batch"], meta["micro_batch"]) == (2, 32, 16), meta


def test_the_same_command_resumes_from_the_newest_checkpoint(killed_and_resumed):
    """The second launch's records go on from the newest complete checkpoint's step, to the end."""
    run = killed_and_resumed
    assert run.second_rc == 0, run.second_log[-6000:]
    step = run.newest_meta["step"]
    assert [m["step"] for m in run.steps[run.first_steps :]] == list(range(step + 1, STEPS + 1))


def test_the_final_checkpoint_and_export_are_both_ranks(killed_and_resumed):
    run_dir = killed_and_resumed.run_dir
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    complete = checkpoint_record(final)
    assert complete["world_size"] == 2 and complete["step"] == STEPS
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert killed_and_resumed.heartbeats[1]["address"] == "127.0.0.2"  # the resumed run on both nodes too
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_no_process_of_the_run_is_left_at_the_end(killed_and_resumed):
    assert not killed_and_resumed.left_at_end


def test_a_stopped_rank_on_the_second_node_ends_the_job_naming_it(ssh_nodes, shards, tmp_path):
    """SIGSTOP of the rank on 127.0.0.2 mid-run (a hung node): rank 0's collective times out after
    train.collective_timeout_s, it names the rank and its node, every process on both nodes ends (the stopped
    one by its watchdog's SIGKILL), and the same command resumes from the newest checkpoint."""
    run_dir = tmp_path / "shared" / "hang"
    marker = str(run_dir.parent)
    timeout_s = 10
    args = small(
        shards,
        run_dir.parent,
        "hang",
        "train.max_steps=16",
        "checkpoint.every_steps=4",
        f"train.collective_timeout_s={timeout_s}",
    )
    env = job_env(
        port=False,
        **ssh_nodes.env,
        HOSTFILE=str(ssh_nodes.hostfile(tmp_path / "hostfile")),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    cmd = list(map(str, ["bash", LAUNCH, *args]))
    log1 = tmp_path / "first.log"
    try:
        with open(log1, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        ckpt = run_dir / "checkpoints" / "step_00000004" / "COMPLETE"
        end = time.time() + 240
        while not ckpt.exists():
            assert proc.poll() is None and time.time() < end, log1.read_text()[-6000:]
            time.sleep(0.05)
        victim = rank_process(marker, 1)
        assert victim is not None and _environ(victim)["SSH_CONNECTION"].split()[2] == "127.0.0.2"
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=timeout_s + 90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {timeout_s + 90} s after the stop:\n{log1.read_text()[-6000:]}")
        took = time.monotonic() - t0
        first = log1.read_text()
        assert rc != 0, first[-4000:]
        assert re.search(
            rf"^127\.0\.0\.1: error: rank 1 on \S+ \(127\.0\.0\.2\), pid {victim}, last at step "
            r"\d+: stopped answering",
            first,
            re.M,
        ), first[-4000:]
        left = wait_gone(marker, 30)
        assert not left, f"processes left after the hung run: {[(p, _cmdline(p)) for p in left]}"
        step = checkpoint_record(newest_complete(run_dir))["step"]
        before = len(metrics(run_dir)[0])
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stdout[-6000:]
        # the same command resumed from the newest checkpoint: its records go on from there
        assert [m["step"] for m in metrics(run_dir)[0][before:]] == list(range(step + 1, 17))
    finally:
        left = kill_all(marker)
    assert not left
    assert took < timeout_s + 60, f"{took:.0f} s from the stop to the job's end"
    print(f"stopped rank -> job ended in {took:.1f} s (collective timeout {timeout_s} s)")


def test_a_rank_that_cannot_start_on_one_node_is_named_at_start(ssh_nodes, shards, tmp_path):
    """The interpreter is broken on 127.0.0.2 alone (a second throwaway sshd whose sessions there get
    PYTHONHOME=/nonexistent, as on a node whose Python or virtualenv is missing): that node's launcher cannot
    start rank 1; rank 0 names it when its rendezvous times out (train.collective_timeout_s), and nothing is
    left on either node."""
    nodes = start_sshd(tmp_path / "sshd", env={"SSHD_SETENV": "127.0.0.2:PYTHONHOME=/nonexistent/python"})
    try:
        run_dir = tmp_path / "shared" / "nostart"
        args = small(shards, run_dir.parent, "nostart", "train.max_steps=4", "train.collective_timeout_s=10")
        env = job_env(
            port=False,
            **nodes.env,
            HOSTFILE=str(nodes.hostfile(tmp_path / "hostfile")),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
        t0 = time.monotonic()
        proc = subprocess.run(
            list(map(str, ["bash", LAUNCH, *args])), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        took = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-4000:]
        errors = [line for line in out.splitlines() if "error: " in line and "never started" in line]
        assert len(errors) == 1 and "rank(s) 1 of 2 never started" in errors[0], out[-4000:]
        assert errors[0].startswith("127.0.0.1: error: "), errors  # rank 0's node says it
        left = wait_gone(str(run_dir.parent), 30)
        assert not left, [(p, _cmdline(p)) for p in left]
        assert not (run_dir / "checkpoints").exists()
    finally:
        nodes.stop()
    print(f"a rank that never started: named after {took:.1f} s (collective timeout 10 s)")


# --- Slurm across two nodes ------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_sbatch_trains_on_two_nodes(slurm_two_nodes, shards, tmp_path):
    """sbatch --nodes=2 launch/slurm/pretrain_22k.sbatch: srun starts one task on each node's slurmd, the
    ranks meet at the job's first node (MASTER_ADDR from the node list) and train into the shared run folder."""
    run_dir = tmp_path / "shared"
    job = slurm_two_nodes.sbatch(
        SBATCH,
        *small(shards, run_dir, "slurm2", "train.max_steps=3"),
        sbatch_args=[
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            f"--output={tmp_path}/job-%j.out",
        ],
        env=sbatch_env(),
        cwd=tmp_path,
    )
    try:
        [state] = slurm_two_nodes.wait(job, timeout=400)
    finally:
        kill_all(str(run_dir))
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert state.ok, f"{state}\n{log[-5000:]}\n{slurm_two_nodes.log_tails()}"
    # one rank on each node: their heartbeats name it
    assert {r: b["address"] for r, b in rank_records(run_dir / "slurm2", "json").items()} == {
        0: "127.0.0.1",
        1: "127.0.0.2",
    }
    for node in ("127.0.0.1", "127.0.0.2"):  # each node's slurmd launched one task of the step
        assert re.search(
            rf"launch task StepId={job}\.0 ", (slurm_two_nodes.state_dir / f"slurmd-{node}.log").read_text()
        ), slurm_two_nodes.log_tails()
    assert [m["step"] for m in metrics(run_dir / "slurm2")[0]] == [1, 2, 3]
    ckpt = run_dir / "slurm2" / "checkpoints" / "step_00000003"
    assert world_and_batch(ckpt) == (2, 32, 16)
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


# --- accelerate launch -----------------------------------------------------------------------------------


def accelerate_args(num_machines: int, port: int) -> list[str]:
    """`accelerate launch` options that start world-2 torch.distributed ranks of `python -m pipeline.train`.
    --multi_gpu is accelerate's torchrun path (it works on CPUs too: gloo); --cpu would take its "simple"
    launcher, which starts one process (several only through mpirun with --mpirun_hostfile)."""
    return [
        "launch",
        "--multi_gpu",
        "--num_machines",
        str(num_machines),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


def test_accelerate_launch_on_one_node_starts_two_ranks(shards, tmp_path):
    cmd = [
        ACCELERATE,
        *accelerate_args(1, free_port()),
        "-m",
        "pipeline.train",
        *small(shards, tmp_path, "acc1", "train.max_steps=3"),
    ]
    proc = subprocess.run(
        list(map(str, cmd)), cwd=REPO, env=job_env(port=False), capture_output=True, text=True, timeout=400
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert [m["step"] for m in metrics(tmp_path / "acc1")[0]] == [1, 2, 3]
    ckpt = tmp_path / "acc1" / "checkpoints" / "step_00000003"
    assert world_and_batch(ckpt) == (2, 32, 16)
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_accelerate_launch_on_two_nodes_through_pdsh(ssh_nodes, shards, tmp_path):
    """The multi-node form: the same `accelerate launch` on every node, each with its --machine_rank (pdsh's
    %n), the first node's address as --main_process_ip; one rank per node here."""
    run_dir = tmp_path / "shared"
    args = [
        *accelerate_args(2, free_port()),
        "--machine_rank",
        "%n",
        "--main_process_ip",
        "127.0.0.1",
        "-m",
        "pipeline.train",
        *small(shards, run_dir, "acc2", "train.max_steps=3"),
    ]
    remote = f"cd {REPO} && {ACCELERATE} " + " ".join(args)
    env = job_env(
        port=False, PATH=ssh_nodes.env["PATH"], PDSH_RCMD_TYPE="ssh", PDSH_SSH_ARGS_APPEND=f"-p {ssh_nodes.port}"
    )
    try:
        proc = subprocess.run(
            ["pdsh", "-S", "-w", ",".join(ssh_nodes.hosts), remote],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        left = kill_all(str(run_dir))
    out = proc.stdout + proc.stderr
    (tmp_path / "pdsh.log").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    assert not left, f"processes of the run were still alive at the end: {left}"
    assert [m["step"] for m in metrics(run_dir / "acc2")[0]] == [1, 2, 3]
    ckpt = run_dir / "acc2" / "checkpoints" / "step_00000003"  # 1 process per node: rank 1 ran on 127.0.0.2
    assert world_and_batch(ckpt) == (2, 32, 16)
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
