"""Multi-node launches, for real on one machine: 127.0.0.1 and 127.0.0.2 are two ssh "nodes" (one throwaway
sshd, tests/servers.py::ssh_nodes) and the deepspeed launcher starts one rank on each over pdsh + ssh, as on a
cluster. Both habits (`HOSTFILE=... bash launch/pretrain_22k.sh` and `deepspeed --hostfile ...
launch/pretrain_22k.sh`) train the tiny recipe at world 2 into a shared run folder; the rank on 127.0.0.2 is
killed with -9 mid-run, the same command is run again, and it resumes from the newest complete checkpoint
and finishes. Also Slurm across two nodes (one slurmd per address, tests/servers.py::slurm_two_nodes) and
`accelerate launch`, one node and two, as more launchers of the same entry point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import ACCELERATE, DEEPSPEED, LAUNCH, job_env, metrics
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


@pytest.mark.parametrize("form", ["bash_hostfile", "deepspeed_hostfile"])
def test_two_nodes_train_and_resume_after_kill_9_of_the_remote_rank(form, ssh_nodes, shards, tmp_path):
    run_dir = tmp_path / "shared" / "mn"  # the shared run folder: an absolute out_dir every node sees
    marker = str(run_dir.parent)
    hostfile = ssh_nodes.hostfile(tmp_path / "hostfile")
    user_dir = tmp_path / "user"  # where the user types the command (relative paths are the user's)
    user_dir.mkdir()
    args = small(
        shards, run_dir.parent, "mn", f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=3"
    )
    port = free_port()
    if form == "bash_hostfile":  # HOSTFILE=... bash launch/pretrain_22k.sh, from the user's own folder
        cmd = ["bash", LAUNCH, *args]
        env = job_env(
            port=False,
            **ssh_nodes.env,
            HOSTFILE=str(hostfile),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **FORWARDED,
        )
        cwd = user_dir
    else:  # as the team types it, in the repository: the script's path and --config are relative
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
    try:
        with open(log1, "w") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        victim_env = _environ(victim)
        os.kill(victim, signal.SIGKILL)
        # it was started over ssh on the second node, by the launcher there, one rank per node
        assert victim_env["SSH_CONNECTION"].split()[2] == "127.0.0.2", victim_env.get("SSH_CONNECTION")
        assert (victim_env["WORLD_SIZE"], victim_env["LOCAL_RANK"]) == ("2", "0")
        if form == "bash_hostfile":  # the project's settings reached the other node (DeepSpeed's runner alone
            # passes on only NCCL*, PYTHON*, MLFLOW*, ...): swin_common/launch_env.py's DS_ENV_FILE
            assert {k: victim_env.get(k) for k in FORWARDED} == FORWARDED
        rank0 = rank_process(marker, 0)
        assert rank0 is not None and _environ(rank0)["SSH_CONNECTION"].split()[2] == "127.0.0.1"
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within 120 s of the kill:\n{log1.read_text()[-6000:]}")
        first = log1.read_text()
        assert rc != 0, first[-4000:]
        # rank 0 names the rank it lost, and where it ran (pipeline/engine/watchdog.py)
        assert re.search(
            r"^127\.0\.0\.1: error: rank 1 on \S+ \(127\.0\.0\.2\), pid \d+, last at step \d+: its "
            r"process ended",
            first,
            re.M,
        ), first[-4000:]
        left = wait_gone(marker, 60)  # pdsh is gone; the ranks' own launchers on each node end them
        assert not left, f"processes left after the killed run: {[(p, _cmdline(p)) for p in left]}"
        assert "127.0.0.1: " in first and "127.0.0.2: " in first, first[-3000:]  # pdsh's per-node prefixes
        assert "global batch 32 = 16 micro x 2 ranks" in first, first[-3000:]
        done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
        newest = done[-1]
        step = json.loads((newest / "COMPLETE").read_text())["step"]
        assert step < STEPS, f"the run finished before the kill took effect ({newest})"

        with open(log2, "w") as out:
            again = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400)
        second = log2.read_text()
        assert again.returncode == 0, second[-6000:]
        assert f"resumed from {newest} at step {step}" in second, second[-6000:]
        assert "127.0.0.2: " in second
    finally:
        left = kill_all(marker)
    assert not left, f"processes of the run were still alive at the end: {left}"
    steps = metrics(run_dir)[0]
    assert steps[-1]["step"] == STEPS
    assert [m["step"] for m in steps[step - STEPS :]] == list(range(step + 1, STEPS + 1))  # the second run's records
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    complete = json.loads((final / "COMPLETE").read_text())
    assert complete["world_size"] == 2 and complete["step"] == STEPS
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert (run_dir / "model" / "model.safetensors").is_file()


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
        newest = max(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
        step = json.loads((newest / "COMPLETE").read_text())["step"]
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stdout[-6000:]
        assert f"resumed from {newest} at step {step}" in again.stdout + again.stderr
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
        REPO / "launch" / "slurm" / "pretrain_22k.sbatch",
        *small(shards, run_dir, "slurm2", "train.max_steps=3"),
        sbatch_args=[
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            f"--output={tmp_path}/job-%j.out",
        ],
        env={"PYTHON": sys.executable, "SWIN_REPO": str(REPO)},
        cwd=tmp_path,
    )
    try:
        [state] = slurm_two_nodes.wait(job, timeout=400)
    finally:
        kill_all(str(run_dir))
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert state.ok, f"{state}\n{log[-5000:]}\n{slurm_two_nodes.log_tails()}"
    assert "2 ranks on 2 node(s) [127.0.0.[1-2]]" in log, log[-3000:]
    assert "global batch 32 = 16 micro x 2 ranks" in log
    for node in ("127.0.0.1", "127.0.0.2"):  # each node's slurmd launched one task of the step
        assert re.search(
            rf"launch task StepId={job}\.0 ", (slurm_two_nodes.state_dir / f"slurmd-{node}.log").read_text()
        ), slurm_two_nodes.log_tails()
    assert [m["step"] for m in metrics(run_dir / "slurm2")[0]] == [1, 2, 3]
    ckpt = run_dir / "slurm2" / "checkpoints" / "step_00000003"
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2
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
    assert "global batch 32 = 16 micro x 2 ranks" in out, out[-4000:]
    assert [m["step"] for m in metrics(tmp_path / "acc1")[0]] == [1, 2, 3]
    ckpt = tmp_path / "acc1" / "checkpoints" / "step_00000003"
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2
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
    assert "global batch 32 = 16 micro x 2 ranks" in out, out[-4000:]
    assert [m["step"] for m in metrics(run_dir / "acc2")[0]] == [1, 2, 3]
    ckpt = run_dir / "acc2" / "checkpoints" / "step_00000003"  # 1 process per node: rank 1 ran on 127.0.0.2
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
