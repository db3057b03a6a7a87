"""Expected failures read as one clear line: every command (`python -m data_prep ...`, `python -m
pipeline.train|pull|predict|register|export`, the main job `python -m pipeline.demo`, and the launchers
launch/pretrain_22k.sh and launch/slurm/pretrain_22k.sbatch) ends a missing or unfinalized shard set, an unknown
model or alias, an unreachable server, a bad path or option, an unreadable image or a bad config key in ONE line
on stderr, `error: ...`, naming the thing, and a non-zero exit (2); under a launcher the line appears once, not
once per rank. Tracebacks are for bugs and for --debug. Each case runs the real command in a fresh process."""

from __future__ import annotations

import atexit
import inspect
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from runs import SBATCH, TINY, job_env, one_node_two_tasks, sbatch_env
from servers import REPO, free_port
from swin_common.cli import CommandError, exit_code_of

NO_ARCH = "error: unknown arch 'swin_huge'; choose one of swin_nano, swin_tiny, swin_small, swin_base, swin_large"
FAST_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


def run(*cmd, env: dict | None = None, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    base = {k: v for k, v in job_env(port=False).items() if k not in ("MLFLOW_TRACKING_URI", "PYTHON")}
    return subprocess.run(
        [*map(str, cmd)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **FAST_MLFLOW, **(env or {})},
    )


def py(*args, **kwargs) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", *args, **kwargs)


def one_line(proc: subprocess.CompletedProcess, *names: str, code: int = 2) -> str:
    """The single `error: ...` line of stderr, after checking the exit status and that it names `names`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr[-4000:]}"
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def unreachable_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free right now: nobody listens there


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "digit.jpg"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(path)
    return path


# -- data_prep ---------------------------------------------------------------------------------------------
def test_data_prep_missing_and_unfinalized_shard_sets(tmp_path, digits_tars, digits_folder):
    one_line(
        py("data_prep", "verify", "/nonexistent/shards"), "shard set not found: /nonexistent/shards does not exist"
    )
    for source, kind in (
        (digits_tars, "a source of 10 per-synset tars"),
        (digits_folder, "a source (an ImageFolder tree of 10 class folders)"),
    ):
        one_line(
            py("data_prep", "verify", source),
            f"{source} is {kind}, not a shard set",
            f"python -m data_prep shard --source {source} --out SHARDS",
        )
    (tmp_path / "set").mkdir()
    one_line(
        py("data_prep", "verify", tmp_path / "set"),
        f"no manifest.json in {tmp_path / 'set'}",
        f"python -m data_prep finalize {tmp_path / 'set'}",
    )
    one_line(py("data_prep", "finalize", tmp_path / "set"), str(tmp_path / "set"), "no prepared shards")


def test_near_misses_name_what_they_found_and_the_command_that_fits(tmp_path, small_set, image):
    """A split folder given as the set, a folder of loose JPEGs given as a set or to finalize, a folder given to
    predict: each one line naming what is there and what to do instead (relative paths named absolute)."""
    (tmp_path / "shards").symlink_to(small_set)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"IMG_{i}.JPG").write_bytes(image.read_bytes())
    one_line(
        py("pipeline.train", "--check", "--config", TINY, "data.shards=shards/train", cwd=tmp_path),
        f"{tmp_path / 'shards' / 'train'} is the 'train' split folder of the shard set {tmp_path / 'shards'}",
        f"give {tmp_path / 'shards'} (the folder holding manifest.json)",
    )
    for cmd in (
        ("pipeline.train", "--check", "--config", TINY, "data.shards=photos"),
        ("data_prep", "verify", "photos"),
        ("data_prep", "finalize", "photos"),
    ):
        one_line(
            py(*cmd, cwd=tmp_path),
            "photos is a folder of 3 loose images, not a shard set",
            "a sub-folder per synset",
            "python -m data_prep shard --source",
        )
    one_line(
        py("pipeline.predict", "models:/tiny@current", "photos", cwd=tmp_path),
        f"{photos} is a folder (3 entries), not an image",
        "e.g. photos/*.jpg",
    )


def test_data_prep_bad_source_layout_and_option(tmp_path):
    one_line(
        py("data_prep", "shard", "--source", "/nonexistent/src", "--out", tmp_path / "out"),
        "source folder does not exist: /nonexistent/src",
    )
    one_line(
        py(
            "data_prep",
            "map",
            "--from",
            tmp_path / "nope.txt",
            "--to",
            tmp_path / "nope2.txt",
            "--out",
            tmp_path / "map.json",
        ),
        f"layout file not found: {tmp_path / 'nope.txt'}",
    )
    one_line(
        py("data_prep", "shard", "--source", tmp_path, "--out", tmp_path / "o", "--workers", "many"),
        "--workers",
        "'many'",
        "--help",
    )
    one_line(py("data_prep", "shard", "--source", tmp_path, "--out", tmp_path / "o", "--bogus"), "--bogus")
    one_line(py("data_prep"), "COMMAND")


def test_debug_shows_the_traceback_of_an_expected_error():
    proc = py("data_prep", "verify", "/nonexistent/shards", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: shard set not found: /nonexistent/shards does not exist")
    )
    debug_env = py("pipeline.train", "--config", TINY, "nosuch.key=1", env={"SWIN_DEBUG": "1"})
    assert debug_env.returncode == 2 and "Traceback" in debug_env.stderr and "ConfigError" in debug_env.stderr


# -- pipeline.train ----------------------------------------------------------------------------------------
def test_train_config_errors():
    one_line(py("pipeline.train", "--config", TINY, "nosuch.key=1"), "unknown key(s) nosuch", "top level takes")
    one_line(py("pipeline.train", "--config", TINY, "train.micro_batch=lots"), "train.micro_batch", "'lots'")
    one_line(py("pipeline.train", "--config", "configs/nope.yaml"), "config file not found: configs/nope.yaml")
    one_line(py("pipeline.train", "data.shards=/x"), "--config")


def test_the_launch_script_answers_help_and_user_errors_before_any_rank_starts(tmp_path):
    """bash launch/pretrain_22k.sh --help prints its text and the train command's options once, and a config
    typo, a config that is not there or a missing shard set is one line, the last one, from a check that runs
    before the launcher starts any rank."""
    launch = REPO / "launch" / "pretrain_22k.sh"
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    helped = run("bash", launch, "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0 and helped.stdout.count("usage: python -m pipeline.train") == 1, helped.stderr
    assert "Training on a cluster" in helped.stdout and "--check" in helped.stdout
    cases = (
        ((f"--config={TINY}", "nosuch.key=1"), ("unknown key(s) nosuch",)),
        (("--config", "nope.yaml"), ("config file not found: nope.yaml", str(tmp_path / "nope.yaml"))),
        (("--config", TINY, "data.shards=/nonexistent"), ("shard set not found: /nonexistent",)),
    )
    for args, names in cases:
        proc = run("bash", launch, *args, cwd=tmp_path, env=env)
        one_line(proc, *names)
        assert "launch.py" not in proc.stdout + proc.stderr and not proc.stdout.strip(), proc.stdout[-2000:]
    for proc in [helped]:
        assert "WORLD INFO" not in proc.stdout + proc.stderr  # no rank was started


def test_the_launch_check_refuses_what_ranks_would_meet_in_one_line(tmp_path, small_set):
    """Through both launch scripts from the user's folder, before any rank starts, exit 2 in one line: an
    init_from whose registered model or alias the store lacks, a file or an export that holds no Swin weights
    (named by its absolute path: relative paths are the launch folder's), an out_dir that cannot be created or
    written, a shard set that is not there (named absolute); nothing is left behind (no run folder, no MLflow
    run)."""
    import torch
    from safetensors.torch import save_file

    from stores import constant_export, local_store, register_export

    uri = local_store(tmp_path / "store")
    register_export(uri, "tiny", constant_export(tmp_path / "export", [f"n{d:08d}" for d in range(10)], 0, 1.0))
    (tmp_path / "swin_base_patch4_window7_224_22k.pth").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    resnet = tmp_path / "resnet"  # an export's layout, other weights
    resnet.mkdir()
    save_file({"conv1.weight": torch.zeros(2, 3, 1, 1)}, str(resnet / "model.safetensors"))
    (resnet / "model.json").write_text(json.dumps({"synsets": [f"n{d:08d}" for d in range(10)]}))
    pretrain, finetune = REPO / "launch" / "pretrain_22k.sh", REPO / "launch" / "finetune_1k_384.sh"
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "MLFLOW_TRACKING_URI": uri}
    common = ("--config", TINY, f"data.shards={small_set}", "out_dir=runs")
    cases = (
        (
            pretrain,
            "init_from=models:/nope@candidate",
            ("init_from=models:/nope@candidate", "not found", "in the MLflow store"),
        ),
        (pretrain, "init_from=models:/tiny@nope", ("init_from=models:/tiny@nope", "alias", "not found")),
        (
            pretrain,
            "init_from=swin_base_patch4_window7_224_22k.pth",
            (f"init_from={tmp_path / 'swin_base_patch4_window7_224_22k.pth'} holds no Swin weights",),
        ),
        (finetune, "init_from=resnet", (f"init_from={resnet / 'model.safetensors'} holds no Swin weights",)),
        (pretrain, "out_dir=/proc/swin_runs", ("out_dir=/proc/swin_runs: cannot be created",)),
        (finetune, "out_dir=/proc", ("out_dir=/proc: cannot be written",)),  # a folder, not writable even by root
        (finetune, "data.shards=no_set", (f"shard set not found: {tmp_path / 'no_set'} does not exist",)),
    )
    for launch, arg, names in cases:
        proc = run("bash", launch, *common, arg, cwd=tmp_path, env=env)
        one_line(proc, *names)
        assert "WORLD INFO" not in proc.stdout + proc.stderr, arg  # no rank was started
    checked = run("bash", pretrain, *common, "--check", cwd=tmp_path, env=env)  # the check alone: no rank
    assert checked.returncode == 0 and "WORLD INFO" not in checked.stdout + checked.stderr, checked.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments() if e.name != "registered"]
    )


@pytest.mark.slow
def test_accelerate_ranks_take_relative_paths_from_the_launch_folder(tmp_path, small_set):
    """`accelerate launch -m pipeline.train` from the user's folder: its rank reads a relative data.shards there
    (else the error would be the shard set's) and names a relative init_from by its absolute path there."""
    from runs import ACCELERATE

    (tmp_path / "set").symlink_to(small_set)
    (tmp_path / "weights.pth").write_bytes(b"\x80\x02}q\x00.")
    launch = ("launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    proc = run(
        ACCELERATE,
        *launch,
        "-m",
        "pipeline.train",
        "--config",
        TINY,
        "data.shards=set",
        "init_from=weights.pth",
        "out_dir=runs",
        cwd=tmp_path,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    said = f"error: init_from={tmp_path / 'weights.pth'} holds no Swin weights (no patch_embed.proj.weight"
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith(said), proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


HELPED = (
    ("pipeline.train",),
    ("pipeline.pull",),
    ("pipeline.predict",),
    ("pipeline.evaluate",),
    ("pipeline.register",),
    ("pipeline.export",),
    ("pipeline.demo",),
    ("data_prep",),
    ("data_prep", "shard"),
    ("data_prep", "verify"),
    ("data_prep", "map"),
    ("data_prep", "finalize"),
    ("data_prep", "embedded"),
)


def test_help_texts_show_no_empty_or_doubled_defaults():
    """No "(default: None)" on a required or unset option, and no option whose default is told twice."""
    import re

    for cmd in HELPED:
        proc = py(*cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, (cmd, proc.stderr[-2000:])
        assert "(default: None)" not in proc.stdout, (cmd, proc.stdout)
        for block in re.split(r"\n  (?=-)", proc.stdout.split("options:")[-1]):
            assert block.lower().count("default") <= 1, (cmd, block)


def test_train_missing_and_unfinalized_shard_set(tmp_path):
    one_line(
        py("pipeline.train", "--config", TINY, "data.shards=/nonexistent", f"out_dir={tmp_path}"),
        "shard set not found: /nonexistent does not exist",
    )
    (tmp_path / "unfinished" / "train").mkdir(parents=True)  # shards being written: no manifest.json yet
    one_line(
        py("pipeline.train", "--config", TINY, f"data.shards={tmp_path / 'unfinished'}", f"out_dir={tmp_path}"),
        f"no manifest.json in {tmp_path / 'unfinished'}",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unfinished"]  # no half-made run folder


def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(tmp_path, small_set):
    """The ranks meet the error after the run folder, its config dump and the MLflow run were made: the folder
    goes (the local MLflow store in out_dir keeps the failed run, as MLflow does)."""
    proc = py(
        "pipeline.train",
        "--config",
        TINY,
        f"data.shards={small_set}",
        "model.arch=swin_huge",
        f"out_dir={tmp_path}",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == NO_ARCH, proc.stderr[-3000:]
    assert not (tmp_path / "tiny_22k").exists(), sorted(map(str, tmp_path.rglob("*")))


def test_another_rank_defers_to_rank_0():
    """Another rank (as a launcher or srun starts it) waits a grace period for the launcher to stop it once rank 0
    has reported; alive after it (rank 0 did not fail the same way), it reports the error itself, naming its rank."""
    for env in ({"RANK": "1"}, {"SLURM_PROCID": "1"}):
        t0 = time.time()
        proc = py("pipeline.train", "--config", TINY, "nosuch.key=1", env={**env, "SWIN_RANK_GRACE_S": "1.5"})
        assert time.time() - t0 >= 1.5
        one_line(proc, "error: rank 1: unknown key(s) nosuch")


@pytest.fixture(scope="module")
def small_set(digits_tars, tmp_path_factory) -> Path:
    """A real shard set (the launchers check the set before any rank starts: errors of the ranks need one)."""
    from servers import run_prep

    out = tmp_path_factory.mktemp("small") / "shards"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 40, "--holdout-per-class", 2)
    return out


@pytest.fixture
def busy_machine():
    """Two processes that keep both cores busy (a loaded CI machine), for as long as the test runs."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for proc in spin:
        proc.kill()
        proc.wait()


RANKED = r"""
import sys
from pipeline.engine.distributed import barrier, init_distributed, shutdown
from swin_common.cli import CommandError, command

@command(ranked=True)
def main(argv=None):
    how = sys.argv[1]
    world = init_distributed(timeout_s=60)
    if how == "same" or how == "differ" or (how == "alone" and world.rank == 1):
        raise CommandError("the shard set is gone" if how != "differ" else f"trouble on rank {world.rank}")
    barrier()  # "alone": rank 0 waits here for rank 1, which failed
    shutdown()
    return 0

raise SystemExit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["same", "differ", "alone"])
def test_ranks_agree_on_what_to_print_whatever_the_timing(how, busy_machine):
    """Two ranks on a busy machine, each started as a launcher starts it, and no launcher to stop either: the
    same error from both shows once; different errors each once, the other rank's with its rank; an error of
    rank 1 alone (rank 0 waits for it in a collective) shows with its rank."""
    port = str(free_port())
    base = job_env(port=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKED, how],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "SWIN_RANK_GRACE_S": "6",
            },
        )
        for r in range(2)
    ]
    if how == "alone":
        procs[1].wait(timeout=120)
        procs[0].kill()  # what a launcher does once rank 1 has exited
    errs = [p.communicate(timeout=120)[1] for p in procs]
    lines = [[line for line in err.splitlines() if line.startswith("error: ")] for err in errs]
    expected = {
        "same": [["error: the shard set is gone"], []],
        "differ": [["error: trouble on rank 0"], ["error: rank 1: trouble on rank 1"]],
        "alone": [[], ["error: rank 1: the shard set is gone"]],
    }[how]
    assert lines == expected, errs
    assert procs[1].returncode == 2


@pytest.mark.slow
def test_launcher_prints_the_error_once(tmp_path, busy_machine, small_set):
    """launch/pretrain_22k.sh starts 2 CPU ranks through the deepspeed launcher on a busy machine: its own lines
    may show, the error line once, no traceback. The shard set is named relative to the user's folder: the check
    and the ranks (which run in the repository) read it there, or the line would be another."""
    (tmp_path / "set").symlink_to(small_set)
    proc = run(
        "bash",
        REPO / "launch" / "pretrain_22k.sh",
        "--config",
        TINY,
        "data.shards=set",
        "model.arch=swin_huge",
        f"out_dir={tmp_path}",
        timeout=300,
        cwd=tmp_path,
        env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port())},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "WORLD INFO" in out, out[-4000:]  # the ranks started, and met the error
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [NO_ARCH], out[-4000:]
    assert "Traceback" not in out
    # the run folder keeps only the watchdog's record of the ranks (another rank's may still write there)
    assert {p.name for p in (tmp_path / "tiny_22k").iterdir()} <= {"ranks"}, sorted(tmp_path.rglob("*"))


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sbatch_prints_the_error_once(slurm_cluster, tmp_path, busy_machine, small_set):
    """launch/slurm/pretrain_22k.sbatch: srun starts 2 tasks on a busy machine; the job log holds the error line
    once (srun stops the other task once one exits non-zero: "once" must not depend on which is first). The shard
    set is named relative to the folder sbatch was called from, which the check and the tasks read it from."""
    (tmp_path / "set").symlink_to(small_set)
    job = slurm_cluster.sbatch(
        SBATCH,
        "--config",
        TINY,
        "data.shards=set",
        "model.arch=swin_huge",
        f"out_dir={tmp_path}",
        sbatch_args=one_node_two_tasks(tmp_path),
        env=sbatch_env(),
        cwd=tmp_path,
    )
    [state] = slurm_cluster.wait(job, timeout=300)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert not state.ok and state.exit_code != 0, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [NO_ARCH], log[-4000:]
    assert "Traceback" not in log


# -- pull, predict: the registry ---------------------------------------------------------------------------
def test_unknown_model_or_alias(mlflow_server, image):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    line = one_line(
        py("pipeline.predict", "models:/nope@current", image, env=env), "models:/nope@current", "MLFLOW_TRACKING_URI"
    )
    assert "not found" in line
    one_line(py("pipeline.pull", "models:/nope/3", env=env), "models:/nope/3", "nope", "not found")


def test_a_read_of_the_registry_never_creates_a_store(mlflow_server, tmp_path, image):
    """pull, predict and evaluate without a store, or naming a local one that is not there, say so and create
    none (MLflow's default would create mlflow.db in the current folder); a model a store lacks is reported with
    the store it looked in."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in (
        ("pipeline.pull", "models:/tiny@current"),
        ("pipeline.predict", "models:/tiny@current", image),
        ("pipeline.evaluate", "models:/tiny@current", "--shards", tmp_path),
    ):
        one_line(py(*cmd, cwd=empty), "no MLflow store given", "MLFLOW_TRACKING_URI", "--tracking-uri")
        missing = tmp_path / "nowhere" / "mlflow.db"
        one_line(py(*cmd, "--tracking-uri", f"sqlite:///{missing}", cwd=empty), f"no MLflow store at {missing}")
        assert not list(empty.iterdir()) and not missing.parent.exists(), cmd
    line = one_line(
        py("pipeline.predict", "models:/nope@current", image, "--tracking-uri", mlflow_server.uri, cwd=empty),
        "models:/nope@current",
        f"in the MLflow store {mlflow_server.uri}",
    )
    assert "not found" in line and not list(empty.iterdir())


def test_unreachable_server(image):
    uri = unreachable_uri()
    one_line(
        py("pipeline.pull", "models:/tiny@current", env={"MLFLOW_TRACKING_URI": uri}),
        f"cannot reach the MLflow server at {uri}",
        "MLFLOW_TRACKING_URI",
    )
    one_line(
        py("pipeline.predict", "models:/tiny@current", image, env={"MLFLOW_TRACKING_URI": uri}),
        "models:/tiny@current",
        f"cannot reach the MLflow server at {uri}",
    )


def test_bad_model_reference_or_path(tmp_path, image):
    env = {"MLFLOW_TRACKING_URI": unreachable_uri()}
    one_line(py("pipeline.pull", "tiny@current", env=env), "'tiny@current' is not models:/NAME@ALIAS")
    one_line(py("pipeline.predict", tmp_path / "no_model", image), str(tmp_path / "no_model"))


def test_missing_or_unreadable_image(tmp_path, image):
    one_line(
        py("pipeline.predict", "models:/tiny@current", tmp_path / "nope.jpg", cwd=tmp_path),
        f"image not found: {tmp_path / 'nope.jpg'}",
    )
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    one_line(py("pipeline.predict", "models:/tiny@current", image, text), f"{text}: not an image")
    one_line(py("pipeline.predict", "models:/tiny@current", image, "-k", "five"), "-k", "'five'")


# -- register, export --------------------------------------------------------------------------------------
def test_register_errors(tmp_path):
    one_line(py("pipeline.register", tmp_path / "nope"), f"run folder not found: {tmp_path / 'nope'}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    one_line(py("pipeline.register", run_dir), "mlflow_run.json", "was not tracked in MLflow")
    # the record keeps a redacted URI: registering needs the real one from MLFLOW_TRACKING_URI
    record = run_dir / "mlflow_run.json"
    record.write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": "http://trainer:***@mlflow.example:5000"}))
    one_line(py("pipeline.register", run_dir), "http://trainer:***@mlflow.example:5000", "set MLFLOW_TRACKING_URI")
    uri = unreachable_uri()
    one_line(
        py("pipeline.register", run_dir, env={"MLFLOW_TRACKING_URI": uri}),
        f"{run_dir / 'model'}",
        "no exported model",
        "pipeline.export",
    )
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.json").write_text(json.dumps({"step": 1}))
    header = b'{"__metadata__": {}}'  # an (empty) safetensors file: the export's own check passes
    (run_dir / "model" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (run_dir / "config.yaml").write_text("name: run\n")
    one_line(
        py("pipeline.register", run_dir, env={"MLFLOW_TRACKING_URI": uri}), f"cannot reach the MLflow server at {uri}"
    )


def test_export_errors(tmp_path):
    one_line(py("pipeline.export", tmp_path / "nope", "--out", tmp_path / "m"), str(tmp_path / "nope"), "not found")
    (tmp_path / "step_00000010").mkdir()
    one_line(
        py("pipeline.export", tmp_path / "step_00000010", "--out", tmp_path / "m"),
        f"{tmp_path / 'step_00000010'} is not a complete checkpoint",
    )
    one_line(py("pipeline.export", tmp_path / "step_00000010"), "--out")


# -- the main job ------------------------------------------------------------------------------------------
def test_main_job_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    one_line(py("pipeline.demo", "--workdir", a_file), str(a_file), "not a folder")
    one_line(py("pipeline.demo", "--pretrain-epochs", "many"), "--pretrain-epochs", "'many'")


# -- which failures are expected ---------------------------------------------------------------------------
# `python -m data_prep map` with a bug put into the project's own code: write_map unpacks two values from a
# map_layouts that returns one, so the ValueError is raised in a frame of data_prep.shardset.layout
BUGGY_MAP = r"""
import sys
import data_prep.shardset.layout as layout
from data_prep.cli import main

layout.map_layouts = lambda source, target: ([],)
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_in_project_code_shows_its_traceback(tmp_path):
    """A plain ValueError raised in the project's own code ("not enough values to unpack") is a bug: its traceback
    and exit 1, not one `error:` line and exit 2; the same command's user error (a layout listing a synset twice)
    is still one line and exit 2."""
    good, twice = tmp_path / "good.txt", tmp_path / "twice.txt"
    good.write_text("n1\nn2\n")
    twice.write_text("n1\nn2\nn1\n")
    bug = run(sys.executable, "-c", BUGGY_MAP, "map", "--from", good, "--to", good, "--out", tmp_path / "map.json")
    assert bug.returncode == 1, bug.stderr[-3000:]
    assert "Traceback (most recent call last)" in bug.stderr and 'data_prep/shardset/layout.py", line' in bug.stderr
    assert bug.stderr.strip().splitlines()[-1] == "ValueError: not enough values to unpack (expected 2, got 1)"
    assert not any(line.startswith("error: ") for line in bug.stderr.splitlines()), bug.stderr[-3000:]
    one_line(
        run(sys.executable, "-c", BUGGY_MAP, "map", "--from", twice, "--to", good, "--out", tmp_path / "m.json"),
        f"{twice}: synset n1 is listed twice (lines 1 and 3)",
    )


def test_expected_failures_and_bugs_are_told_apart():
    import numpy as np

    from data_prep.shardset.layout import LayoutError, parse_layout
    from pipeline.config import ConfigError, load_config
    from pipeline.data.order import epoch_order
    from swin_common.errors import UserError

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("nothing raised")

    assert exit_code_of(raised(lambda: load_config(None, ["nosuch=1"]))) == 2  # ConfigError: a UserError
    assert exit_code_of(raised(lambda: parse_layout("n1\nn1\n"))) == 2 and issubclass(LayoutError, ValueError)
    assert exit_code_of(raised(lambda: epoch_order([4], 0, 0, rank=2, world=2))) is None  # a ValueError of ours: a bug
    assert exit_code_of(type("Diverged", (UserError, RuntimeError), {"exit_code": 3})("x")) == 3
    assert exit_code_of(raised(lambda: open("/nonexistent/file"))) == 2
    assert exit_code_of(CommandError("x", exit_code=4)) == 4
    assert exit_code_of(raised(lambda: np.zeros(3).reshape(2))) is None  # a ValueError from a library: a bug
    assert exit_code_of(raised(lambda: {}["k"])) is None
    assert exit_code_of(ConfigError("x"), exit_codes={ConfigError: 5}) == 5
    assert exit_code_of(ConfigError("x"), exit_codes={"ConfigError": 5}) == 5  # by name: no import needed


# -- the exit path -----------------------------------------------------------------------------------------
EXITING = r"""
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from swin_common.cli import exit_process

atexit.register(lambda: print("atexit handler ran", flush=True))
pool = ThreadPoolExecutor(2)  # never shut down: its workers end through threading's own exit hook
pool.submit(time.sleep, 0.1)
threading.Thread(target=lambda: (time.sleep(0.5), print("thread joined", flush=True))).start()
exit_process(3)
"""


def test_exit_process_ends_threads_and_runs_exit_handlers():
    """exit_process: threading's exit hooks (concurrent.futures': an executor never shut down would keep the join
    waiting forever), the non-daemon threads joined, then the atexit handlers, then the status."""
    proc = run(sys.executable, "-c", EXITING, timeout=60)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["thread joined", "atexit handler ran"], proc.stdout


STORE_OF_THE_GROUP = r"""
import inspect
from datetime import timedelta
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

print(list(inspect.signature(_get_default_store).parameters))
dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, 1, True), rank=0, world_size=1)
store = _get_default_store()
print(isinstance(store, dist.Store))
store.set("swin/error/0", "line")
store.wait(["swin/error/0"], timedelta(seconds=5))
print(store.get("swin/error/0").decode())
dist.destroy_process_group()
"""


def test_the_private_apis_of_the_exit_path_are_there():
    """exit_process and the ranked error report use CPython's and torch's own private functions, for which there is
    no public way: threading._shutdown, atexit._run_exitfuncs, torch.distributed's _get_default_store (the process
    group's key-value store, which the ranks compare their error lines through). Checked in the pinned versions
    (CPython 3.11, torch 2.14.1), so that an upgrade that drops or changes one fails here."""
    assert not inspect.signature(threading._shutdown).parameters
    assert callable(atexit._run_exitfuncs) and atexit._run_exitfuncs.__module__ == "atexit"
    store = run(sys.executable, "-c", STORE_OF_THE_GROUP, timeout=120)
    assert store.returncode == 0 and store.stdout.split() == ["[]", "True", "line"], store.stdout + store.stderr[-3000:]
