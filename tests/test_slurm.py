"""The Slurm launch scripts on a real one-node cluster: launch/slurm/submit_prep.sh queues the
prep_shards.sbatch array and the finalize job; the array's shards equal a one-task run's, byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_prep.embedded import write_synset_tars
from servers import REPO, run_prep

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SUBMIT = REPO / "launch" / "slurm" / "submit_prep.sh"
SBATCH = REPO / "launch" / "slurm" / "prep_shards.sbatch"
ARGS = ["--max-samples", "100", "--holdout-per-class", "5"]


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    return write_synset_tars(tmp_path_factory.mktemp("slurmsrc") / "tars")


def shard_set(root: Path) -> dict[str, bytes]:
    """Every file of the shard set a reader uses (shards, indexes, synsets.txt, manifest.json)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith("_")
    }


def printed_json(log: str) -> dict:
    """The JSON summary a data_prep command printed into its (stdout and stderr) job log."""
    m = re.search(r"^\{$.*?^\}$", log, re.M | re.S)
    assert m, f"no JSON summary in the log:\n{log[-3000:]}"
    return json.loads(m.group(0))


def submit(cluster, *args, cwd: Path) -> tuple[int, int]:
    proc = cluster.run(SUBMIT, *args, cwd=cwd)
    ids = dict(re.findall(r"^(ARRAY_JOB_ID|FINALIZE_JOB_ID)=(\d+)$", proc.stdout, re.M))
    assert set(ids) == {"ARRAY_JOB_ID", "FINALIZE_JOB_ID"}, proc.stdout + proc.stderr
    return int(ids["ARRAY_JOB_ID"]), int(ids["FINALIZE_JOB_ID"])


def test_array_job_writes_the_one_task_shard_set(slurm_cluster, tars, tmp_path):
    out, logs = tmp_path / "slurm_out", tmp_path / "logs"
    array_id, finalize_id = submit(
        slurm_cluster, "--array", "0-2", "--cpus-per-task", "1", "--log-dir", logs, tars, out, *ARGS, cwd=tmp_path
    )
    tasks = slurm_cluster.wait(array_id, timeout=600)
    finalize = slurm_cluster.wait(finalize_id, timeout=120)

    def log_of(path: str) -> str:
        return Path(path).read_text() if Path(path).exists() else f"(no log at {path})"

    assert [t.array_task_id for t in tasks] == ["0", "1", "2"]
    for t in tasks:
        assert t.array_job_id == array_id
        assert t.ok, f"task {t.array_task_id}: {t.state} exit {t.exit_code}\n{log_of(t.stdout)[-3000:]}"
    assert len(finalize) == 1 and finalize[0].ok, f"finalize: {finalize}\n{log_of(finalize[0].stdout)}"

    for i in range(3):  # each task logged under the name the submit script promised, and did its share
        text = (logs / f"prep-shards-{array_id}_{i}.out").read_text()
        assert f"task {i}/3:" in text, text[-3000:]
        assert printed_json(text)["shards_failed"] == 0
    final_log = (logs / f"prep-finalize-{finalize_id}.out").read_text()
    assert printed_json(final_log)["manifest"] == f"{out}/manifest.json"

    single = tmp_path / "single"
    run_prep("shard", "--source", tars, "--out", single, *ARGS)
    got, want = shard_set(out), shard_set(single)
    assert sorted(got) == sorted(want)
    assert "manifest.json" in got and "synsets.txt" in got
    manifest = json.loads(want["manifest.json"])
    assert manifest["totals"]["train"]["shards"] == 18 and manifest["totals"]["val"]["shards"] == 1
    assert sum(n.endswith(".tar") for n in got) == 19 and sum(n.endswith(".idx") for n in got) == 19
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"the array's files differ from the one-task run's: {different}"
    assert run_prep("verify", out, check=False).returncode == 0


def test_a_failing_array_cancels_finalize(slurm_cluster, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    array_id, finalize_id = submit(
        slurm_cluster,
        "--array",
        "1-2",
        "--cpus-per-task",
        "1",
        "--log-dir",
        logs,
        tmp_path / "no_such_source",
        out,
        cwd=tmp_path,
    )
    tasks = slurm_cluster.wait(array_id, timeout=300)
    assert [t.array_task_id for t in tasks] == ["1", "2"]
    assert all(t.state == "FAILED" and t.exit_code == 2 for t in tasks), tasks
    for t in tasks:
        assert "error: source folder does not exist" in Path(t.stdout).read_text()
    finalize = slurm_cluster.wait(finalize_id, timeout=120)
    assert finalize[0].state == "CANCELLED", finalize
    assert not (out / "manifest.json").exists()


def test_a_stepped_array_covers_every_shard(slurm_cluster, tars, tmp_path):
    """--array=0-4:2 gives ids 0, 2, 4: data_prep maps them onto task indexes 0, 1, 2 of 3."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    array_id, finalize_id = submit(
        slurm_cluster,
        "--array",
        "0-4:2",
        "--cpus-per-task",
        "1",
        "--log-dir",
        logs,
        tars,
        out,
        "--max-samples",
        "300",
        cwd=tmp_path,
    )
    tasks = slurm_cluster.wait(array_id, timeout=600)
    assert [t.array_task_id for t in tasks] == ["0", "2", "4"] and all(t.ok for t in tasks), tasks
    assert slurm_cluster.wait(finalize_id, timeout=120)[0].ok
    for index, task_id in enumerate(("0", "2", "4")):
        assert f"task {index}/3:" in (logs / f"prep-shards-{array_id}_{task_id}.out").read_text()
    assert run_prep("verify", out, "--no-decode", check=False).returncode == 0


def test_a_list_of_array_ids_is_refused(slurm_cluster, tars, tmp_path):
    job = slurm_cluster.sbatch(
        SBATCH,
        tars,
        tmp_path / "out",
        cwd=tmp_path,
        sbatch_args=["--array=1,5", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out"],
    )
    tasks = slurm_cluster.wait(job, timeout=300)
    assert [(t.state, t.exit_code) for t in tasks] == [("FAILED", 2), ("FAILED", 2)]
    assert "must be a range" in Path(tasks[0].stdout).read_text()
    assert not (tmp_path / "out").exists()


def test_the_sbatch_script_takes_its_arguments_from_the_environment(slurm_cluster, tars, tmp_path):
    """sbatch prep_shards.sbatch directly, one task, SOURCE/OUT/options from PREP_* (submit dir: tmp_path)."""
    job = slurm_cluster.sbatch(
        SBATCH,
        sbatch_args=["--array=5-5", "--cpus-per-task=2", "--job-name=envprep"],
        env={"PREP_SOURCE": str(tars), "PREP_OUT": "rel_out", "PREP_ARGS": "--max-samples 1000 --holdout-per-class 2"},
        cwd=tmp_path,
    )
    [task] = slurm_cluster.wait(job, timeout=600)
    log = tmp_path / f"envprep-{job}_5.out"  # the script's default --output, in the submit directory
    assert task.ok, log.read_text()[-3000:] if log.exists() else task
    text = log.read_text()
    assert "task 0/1:" in text and "cpus 2:" in text
    manifest = json.loads((tmp_path / "rel_out" / "manifest.json").read_text())
    assert manifest["options"]["max_samples"] == 1000 and manifest["options"]["holdout_per_class"] == 2
    assert manifest["totals"]["val"]["samples"] == 20 and manifest["totals"]["train"]["shards"] == 2


def test_srun_runs_a_two_task_step(slurm_cluster):
    proc = slurm_cluster.run("srun", "-n2", "bash", "-c", 'echo "rank=$SLURM_PROCID of $SLURM_NTASKS"', timeout=60)
    assert sorted(proc.stdout.splitlines()) == ["rank=0 of 2", "rank=1 of 2"]
