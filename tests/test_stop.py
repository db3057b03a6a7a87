"""Stop signals for real: a 2-rank CPU run under launch/pretrain_22k.sh gets SIGTERM (to the script, as a user,
Kubernetes or an sbatch script sends it) mid-epoch, then SIGUSR1 to one rank only while it evaluates; each time
every rank finishes its step, the ranks agree, save a checkpoint at the step reached (checkpoint.every_steps far
away), exit 75 within the launcher's grace, and MLflow records why; the same command resumes there, and the loss
curve of the three jobs equals an uninterrupted run's, step for step."""

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

from runs import LAUNCH, SBATCH, TINY, job_env, one_node_two_tasks, records, sbatch_env, small
from servers import REPO, rank_pid

pytestmark = pytest.mark.slow
EXIT_STOPPED = 75
GRACE_S = 30  # the deepspeed launcher's SIGTERM -> SIGKILL (launch.py, terminate_process_tree)


def command(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """The small run with a long schedule cut by max_steps, an evaluation every 5 steps in 50 small batches per
    rank (so that a signal can land in one), checkpoints only far away."""
    return list(
        map(
            str,
            [
                "bash",
                LAUNCH,
                *small(
                    shards,
                    out,
                    name,
                    "eval.batch_size=2",
                    "eval.every_steps=5",
                    "schedule.epochs=20",
                    "train.max_steps=40",
                    "checkpoint.every_steps=1000",
                    *extra,
                    tracked=True,
                ),
            ],
        )
    )


def wait_for_record(run_dir: Path, proc: subprocess.Popen, log: Path, want, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while True:
        found = [r for r in records(run_dir) if want(r)]
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first:\n{log.read_text()[-5000:]}"
        assert time.time() < end, f"no such record after {timeout} s:\n{log.read_text()[-5000:]}"
        time.sleep(0.005)


def stop_and_wait(proc: subprocess.Popen, log: Path) -> float:
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=GRACE_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running {GRACE_S + 30} s after the signal:\n{log.read_text()[-5000:]}")
    assert rc == EXIT_STOPPED, f"exit {rc}:\n{log.read_text()[-5000:]}"
    return time.monotonic() - t0


def newest_checkpoint(run_dir: Path) -> tuple[int, dict]:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    meta = json.loads((done[-1] / "COMPLETE").read_text())
    assert sorted(p.name for p in done[-1].glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    return meta["step"], meta


def test_the_stop_flag_is_installed_before_the_slow_imports():
    """The train command installs its stop handler first; importing pipeline.engine.stop must not load torch (or
    anything slow), else a Slurm signal in a job's first seconds kills the task instead of stopping it."""
    # nor tqdm: it reads TQDM_DISABLE when imported, which the command sets for a job's log after its imports
    probe = (
        "import sys, pipeline.train, pipeline.engine.stop; "
        "print(sorted({'torch', 'deepspeed', 'timm', 'tqdm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_stop_reaches_the_other_ranks_intact():
    """Rank 0 broadcasts a stop that came during its export (broadcast_object pickles it)."""
    import pickle

    from pipeline.engine.stop import RunStopped

    back = pickle.loads(pickle.dumps(RunStopped("SIGUSR1", 312, "after the export")))
    assert (back.signal_name, back.step, back.during, str(back)) == (
        "SIGUSR1",
        312,
        "after the export",
        "SIGUSR1 at step 312 (after the export)",
    )


@pytest.fixture
def started():
    """Launches of the test, each in its own session: whatever is left of them is killed at the end."""
    procs: list[subprocess.Popen] = []
    yield procs
    kill_sessions(procs)


def kill_sessions(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Phase:
    """What one job of the scenario left: its exit status and time from the signal to the exit, the run's records
    and newest checkpoint, and its MLflow run, as they were when the job ended."""

    def __init__(self, run_dir: Path, rc: int, seconds: float | None, client, run_id: str | None):
        self.rc, self.seconds = rc, seconds
        self.records = records(run_dir)
        self.steps = [r for r in self.records if "loss" in r]
        self.evals = [r for r in self.records if "val_top1" in r]
        self.stops = [r for r in self.records if "stopped" in r]
        self.checkpoint = newest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
        model = run_dir / "model" / "model.json"
        self.model = (model.read_text(), model.stat().st_mtime_ns) if model.is_file() else None
        run = client.get_run(run_id) if run_id else None
        self.status = run.info.status if run else None
        self.tags = dict(run.data.tags) if run else {}
        self.versions = len(client.search_model_versions(f"name='{run_dir.name}'")) if run else 0


@pytest.fixture(scope="module")
def scenario(shards, mlflow_server, tmp_path_factory):
    """An uninterrupted run, then one run stopped three times and finished by the same command:
    0. the uninterrupted run, sent SIGUSR1 over and over once it is complete;
    1. SIGTERM to the launch script mid-epoch (50 steps per epoch here), between checkpoints;
    2. the same command; SIGUSR1 to rank 1 alone while it evaluates;
    3. the same command; SIGTERM while rank 0 writes the export;
    4. the same command, to its end (it registers what the export holds)."""
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("stops")
    client, procs, out = MlflowClient(mlflow_server.uri), [], {}
    try:
        log0 = tmp_path / "straight.log"
        with open(log0, "w") as log:
            proc = subprocess.Popen(
                command(shards, tmp_path, "straight", "tracking.enabled=false"),
                cwd=REPO,
                env=job_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(proc)
        out["signals_after_the_end"] = signal_after_the_end(tmp_path / "straight", proc, log0)
        out[0] = Phase(tmp_path / "straight", proc.returncode, None, client, None)

        run_dir = tmp_path / "stopped"
        cmd = command(shards, tmp_path, "stopped", "tracking.system_metrics=false")
        run_env = job_env(MLFLOW_TRACKING_URI=mlflow_server.uri)

        def launch(name: str) -> tuple[subprocess.Popen, Path]:
            path = tmp_path / f"{name}.log"
            with open(path, "w") as log:  # from the user's folder, not the repository: the script is all it needs
                proc = subprocess.Popen(
                    cmd, cwd=tmp_path, env=run_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            procs.append(proc)
            return proc, path

        def run_id() -> str:
            return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

        proc, log1 = launch("first")
        wait_for_record(run_dir, proc, log1, lambda r: r.get("step", 0) >= 12 and "loss" in r)
        proc.send_signal(signal.SIGTERM)
        seconds = stop_and_wait(proc, log1)
        out[1] = Phase(run_dir, proc.returncode, seconds, client, run_id())

        proc, log2 = launch("second")
        out["eval_step"] = eval_step = (out[1].checkpoint[0] // 5 + 2) * 5
        wait_for_record(run_dir, proc, log2, lambda r: r.get("step") == eval_step and "loss" in r)
        os.kill(rank_pid(run_dir, 1), signal.SIGUSR1)  # logged, then evaluated: the evaluation is under way
        seconds = stop_and_wait(proc, log2)
        out[2] = Phase(run_dir, proc.returncode, seconds, client, run_id())

        proc, log3 = launch("third")
        signal_during_the_export(run_dir, proc, log3)
        seconds = stop_and_wait(proc, log3)
        out[3] = Phase(run_dir, proc.returncode, seconds, client, run_id())

        done = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-5000:]
        out[4] = Phase(run_dir, done.returncode, None, client, run_id())
        out["run_id"], out["client"] = run_id(), client
    finally:
        kill_sessions(procs)
    return out


def test_a_finished_run_exits_0_whatever_signals_come_as_it_shuts_down(scenario):
    straight = scenario[0]
    assert straight.rc == 0 and scenario["signals_after_the_end"] > 0
    assert [r["step"] for r in straight.steps] == list(range(1, 41)) and not straight.stops


def test_sigterm_mid_epoch_saves_the_step_reached_within_the_grace(scenario):
    first = scenario[1]
    step1, meta1 = first.checkpoint
    assert [(r["step"], r["stopped"]) for r in first.stops] == [(step1, "SIGTERM")], first.stops
    assert 12 <= step1 < 40 and meta1["stopped"] == "SIGTERM", meta1
    assert max(r["step"] for r in first.steps) == step1  # no step after the one saved
    assert first.rc == EXIT_STOPPED and first.seconds < GRACE_S, f"{first.seconds:.1f} s from SIGTERM to exit"
    during = first.stops[0]["during"]  # "evaluation" when the step reached was one of every 5th
    assert during == ("evaluation" if step1 % 5 == 0 else "training"), first.stops
    assert first.status == "KILLED" and first.tags["swin.stopped"] == f"SIGTERM at step {step1} ({during})"


def test_a_signal_to_one_rank_during_an_evaluation_stops_both_and_owes_it(scenario):
    first, second, eval_step = scenario[1], scenario[2], scenario["eval_step"]
    resumed = [r for r in second.steps if r["step"] > first.checkpoint[0]]
    assert resumed[0]["step"] == first.checkpoint[0] + 1  # resumed where the first job saved
    step2, meta2 = second.checkpoint
    assert second.rc == EXIT_STOPPED and step2 == eval_step and meta2["pending_eval"] is True, meta2
    assert second.stops[-1]["during"] == "evaluation" and second.stops[-1]["stopped"] == "SIGUSR1"
    assert not any(r["step"] == eval_step for r in second.evals)
    assert second.tags["swin.stopped"] == f"SIGUSR1 at step {eval_step} (evaluation)"


def test_a_signal_during_the_export_keeps_the_export_and_leaves_registering(scenario):
    third = scenario[3]
    assert third.rc == EXIT_STOPPED and third.checkpoint[0] == 40
    assert json.loads(third.model[0])["step"] == 40  # the export is kept
    assert third.status == "KILLED" and third.tags["swin.stopped"] == "SIGTERM at step 40 (after the export)"
    assert any(r["step"] == scenario["eval_step"] for r in third.evals)  # the owed evaluation came first
    assert scenario[4].model[1] == third.model[1]  # the finishing job did not export again
    assert third.versions == 0  # registering is the resumed job's


def test_the_same_command_finishes_like_an_uninterrupted_run_and_registers_it(scenario):
    final, straight, client, run_id = scenario[4], scenario[0], scenario["client"], scenario["run_id"]
    assert [r["step"] for r in final.steps] == list(range(1, 41)), "a step was lost or done twice"
    assert {r["step"]: r["loss"] for r in final.steps} == {r["step"]: r["loss"] for r in straight.steps}
    assert [r["step"] for r in final.evals] == list(range(5, 41, 5))
    assert final.status == "FINISHED" and final.rc == 0
    history = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(history)) == list(range(1, 41))
    [version] = client.search_model_versions("name='stopped'")  # (a search's versions carry no aliases)
    assert version.run_id == run_id, version
    assert client.get_model_version_by_alias("stopped", "candidate").version == version.version


def signal_after_the_end(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """Once rank 0 has printed the run's summary, SIGUSR1 to every rank still there, every 20 ms, until the job
    exits (a Slurm time-limit signal that comes as a finished run shuts down); the number of signals sent. The
    summary is looked for every 2 ms (the ranks may be gone within tens of ms of it on a busy machine)."""
    end, sent = time.time() + timeout, 0
    with open(log, "rb") as f:
        seen = b""
        while b'"mlflow_run"' not in seen:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first:\n{log.read_text()[-5000:]}"
            assert time.time() < end, log.read_text()[-5000:]
            seen = seen[-64:] + f.read()
            time.sleep(0.002)
    while proc.poll() is None:
        for rank in (0, 1):
            try:
                os.kill(rank_pid(run_dir, rank), signal.SIGUSR1)  # looked up each time: a pid may be reused
                sent += 1
            except (AssertionError, ProcessLookupError):
                pass
        assert time.time() < end, log.read_text()[-5000:]
        time.sleep(0.02)
    return sent


def wait_for_ranks(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> list[int]:
    """The pids of ranks 0 and 1, once the launcher has started them."""
    end = time.time() + timeout
    while True:
        try:
            return [rank_pid(run_dir, r) for r in (0, 1)]
        except AssertionError:
            assert proc.poll() is None and time.time() < end, log.read_text()[-5000:]
            time.sleep(0.05)


def signal_during_the_export(run_dir: Path, proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM to both ranks while rank 0 writes <run>/model.tmp (rank 1 waits): rank 0 is frozen (SIGSTOP) once
    the folder is seen and the signal counts only if the folder is still there; it is handled when rank 0 goes on."""
    ranks = wait_for_ranks(run_dir, proc, log)
    tmp, end = run_dir / "model.tmp", time.time() + 300
    while not tmp.exists():
        assert proc.poll() is None and time.time() < end, log.read_text()[-5000:]
        time.sleep(0.002)
    os.kill(ranks[0], signal.SIGSTOP)
    try:
        assert tmp.exists(), "the export was over before rank 0 could be frozen"
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
    finally:
        os.kill(ranks[0], signal.SIGCONT)


def test_a_signal_during_warm_up_or_a_periodic_checkpoint_stops_at_the_next_boundary(shards, tmp_path, started):
    """SIGTERM while the ranks are still starting (their heartbeats are there, no step yet): they build the
    engine, take one step and stop there with a checkpoint. Then SIGTERM while a periodic checkpoint is being
    written: that checkpoint completes and is the stop's, none is saved twice."""
    run_dir = tmp_path / "edges"
    cmd = command(shards, tmp_path, "edges", "tracking.enabled=false", "checkpoint.every_steps=4", "eval.every_steps=0")
    log1 = tmp_path / "warmup.log"
    with open(log1, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(proc)
    end = time.time() + 300
    while not (run_dir / "ranks" / "rank_00001.json").is_file():  # set up, before the loaders and the engine
        assert proc.poll() is None and time.time() < end, log1.read_text()[-5000:]
        time.sleep(0.01)
    assert not [r for r in records(run_dir) if "loss" in r]
    proc.send_signal(signal.SIGTERM)
    stop_and_wait(proc, log1)
    assert newest_checkpoint(run_dir)[0] == 1, log1.read_text()[-3000:]
    assert [(r["step"], r["stopped"]) for r in records(run_dir) if "stopped" in r] == [(1, "SIGTERM")]

    log2 = tmp_path / "periodic.log"
    with open(log2, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(proc)
    step = signal_during_a_checkpoint(run_dir, proc, log2, steps=range(8, 40, 4))
    stop_and_wait(proc, log2)
    newest, meta = newest_checkpoint(run_dir)
    assert newest == step and "stopped" not in meta, meta  # the periodic one, not saved again at the stop
    stop = [r for r in records(run_dir) if "stopped" in r][-1]
    assert (stop["step"], stop["checkpoint_s"]) == (step, 0.0), stop
    assert "its checkpoint was saved already" in log2.read_text()


def signal_during_a_checkpoint(run_dir: Path, proc: subprocess.Popen, log: Path, steps) -> int:
    """SIGTERM to both ranks while the periodic checkpoint of one of `steps` is being written; returns its step.
    A tiny checkpoint takes ~0.1 s: the ranks are frozen (SIGSTOP) once its temporary folder is seen, and the
    signal counts only if that folder is still there, i.e. frozen before the checkpoint was complete; else the
    next periodic checkpoint is tried. The signal is then pending and is handled the moment they go on."""
    ranks, end = wait_for_ranks(run_dir, proc, log), time.time() + 300
    for step in steps:
        tmp = run_dir / "checkpoints" / f".tmp-step_{step:08d}"
        while not tmp.exists():
            assert proc.poll() is None and time.time() < end, log.read_text()[-5000:]
            time.sleep(0.002)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        try:
            if tmp.exists():
                for pid in ranks:
                    os.kill(pid, signal.SIGTERM)
                return step
        finally:
            for pid in ranks:
                os.kill(pid, signal.SIGCONT)
    pytest.fail(f"no periodic checkpoint of {list(steps)} was caught being written:\n{log.read_text()[-3000:]}")


# --- Slurm: the time limit requeues, scancel does not ------------------------------------------------------


def submit(
    cluster,
    shards: Path,
    tmp_path: Path,
    *sbatch_args: str,
    steps: int | None = None,
    config: Path = TINY,
    python: Path | str = sys.executable,
) -> int:
    limit = [f"train.max_steps={steps}"] if steps is not None else []
    return cluster.sbatch(
        SBATCH,
        *small(shards, tmp_path, "sl", "schedule.epochs=20", "checkpoint.every_steps=1000", *limit, config=config),
        sbatch_args=one_node_two_tasks(tmp_path, *sbatch_args),
        env=sbatch_env(python),
        cwd=tmp_path,
    )


STOPPED_AND_REQUEUED = "stopped at a checkpoint before the time limit; requeued to resume from it"
REQUEUED_WHILE_STARTING = "the tasks were still starting when the time-limit signal came (exit 138): requeued"


@pytest.mark.slurm
def test_slurm_time_limit_checkpoints_requeues_and_finishes_over_several_jobs(slurm_cluster, shards, tmp_path):
    """--time=1 with the signal 40 s before it, which Slurm may send up to 60 s early, so at any point of a job.
    Job 1 starts slowly (the interpreter is a script that sleeps first, as on a node that is slow to start): the
    signal kills its tasks before they handle it, and the job is requeued all the same. Job 2 trains until the
    signal, stops at the step it reached, requeues itself, and the next job resumes there, until the run is done;
    one submission. How many steps one job gets depends on the machine, so the run's end (train.max_steps, in
    the config file every job reads) is set once a job has stopped at a step: 10 steps further. Slurm holds a
    requeued job for a while (BeginTime, ~2.5 minutes); the test, as the cluster's admin, lets it start after
    3 s: slurmd refuses a job whose credential is from the second its previous run was killed in ("Job
    credential revoked")."""
    import yaml

    config = tmp_path / "run.yaml"
    tree = yaml.safe_load(TINY.read_text())
    config.write_text(yaml.safe_dump(tree))  # the whole schedule (20 epochs): far more than one job trains
    slow_start = tmp_path / "slow_start_python"
    slow_start.write_text(  # the tasks start slowly; the batch script's check of the config does not
        f'#!/bin/bash\ncase " $* " in *" --check "*) ;; *) [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && sleep 300 ;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    slow_start.chmod(0o755)
    job = submit(slurm_cluster, shards, tmp_path, "--time=1", "--signal=B:USR1@40", config=config, python=slow_start)
    run_dir, log = tmp_path / "sl", tmp_path / f"job-{job}.out"
    end, restarts, held, final = time.time() + 600, 0, 0.0, None
    while True:
        [state] = slurm_cluster.job_states(job)
        restarts = max(restarts, int(re.search(r"Restarts=(\d+)", state.raw).group(1)))
        if state.state == "PENDING" and state.reason == "BeginTime":
            stops = [r["step"] for r in records(run_dir) if "stopped" in r]
            if final is None and stops:
                final = stops[-1] + 10
                config.write_text(yaml.safe_dump({**tree, "train": {**tree.get("train", {}), "max_steps": final}}))
            held = held or time.time()
            if time.time() - held > 3:
                slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        else:
            held = 0.0
        if state.finished:
            break
        assert time.time() < end, f"job {job} still {state.state} after 600 s:\n{log.read_text()[-5000:]}"
        time.sleep(0.5)
    text = log.read_text()
    assert state.state == "COMPLETED" and state.exit_code == 0, f"{state}\n{text[-5000:]}"
    early, stopped = text.count(REQUEUED_WHILE_STARTING), text.count(STOPPED_AND_REQUEUED)
    assert early >= 1 and "User defined signal 1" in text, text[-5000:]  # job 1, killed while it slept
    assert stopped >= 1 and early + stopped == restarts, (early, stopped, restarts, text[-5000:])
    stops = [r for r in records(run_dir) if "stopped" in r]
    assert len(stops) == stopped and all(r["stopped"] == "SIGUSR1" for r in stops), stops
    for r in stops:  # each job resumed where the one before it stopped
        step = r["step"]
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in text
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, final + 1))
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slurm
def test_scancel_saves_the_step_reached_and_is_not_requeued(slurm_cluster, shards, tmp_path):
    job = submit(slurm_cluster, shards, tmp_path, steps=2000)
    run_dir, log = tmp_path / "sl", tmp_path / f"job-{job}.out"
    end = time.time() + 300
    while not any(r.get("step", 0) >= 5 for r in records(run_dir)):
        assert time.time() < end and not slurm_cluster.job_states(job)[0].finished, log.read_text()[-5000:]
        time.sleep(0.05)
    slurm_cluster.run("scancel", job)
    [state] = slurm_cluster.wait(job, timeout=120)
    time.sleep(3)  # a requeue would show by now
    [state] = slurm_cluster.job_states(job)
    text = log.read_text()
    assert state.state == "CANCELLED" and state.exit_code == 75, f"{state}\n{text[-5000:]}"
    assert "Restarts=0" in state.raw and "requeued" not in text, text[-3000:]
    [stop] = [r for r in records(run_dir) if "stopped" in r]
    assert stop["stopped"] == "SIGTERM" and 5 <= stop["step"] < 2000
    assert (run_dir / "checkpoints" / f"step_{stop['step']:08d}" / "COMPLETE").is_file()
    assert max(r["step"] for r in records(run_dir) if "loss" in r) == stop["step"]
