"""Checkpoints that prove they are whole: every file's size and checksum in the COMPLETE marker; `resume: auto`
sets aside a checkpoint that fails its check or fails to load (`step_N.damaged-<reason>`) and resumes from the
newest one that passes, saying so in metrics.jsonl and MLflow; never silently from scratch; keep_last never
deletes the checkpoint the run resumed from; the export checks before it reads.

The checks themselves on folders made here (no launch); then one 2-rank run relaunched twice: its newest
checkpoint's optimizer file truncated (the check catches it), then a checkpoint with an old-style marker whose
module file does not load (the load catches it)."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.engine.checkpoint import (
    MARKER,
    CheckpointDamaged,
    check_checkpoint,
    file_checksums,
    find_resume,
    storage_failure,
)
from pipeline.engine.model_export import consolidated_state_dict
from runs import LAUNCH, records, run, small

# -- the checks, on folders made here --------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, checksums: bool = True) -> Path:
    """A folder shaped like a checkpoint: two torch files and a text file, its marker last."""
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0) + step}, path / "mp_rank_00_model_states.pt")
    torch.save({"m": torch.ones(3000)}, path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (path / "synsets.txt").write_text("n01\nn02\n")
    meta: dict = {"step": step, "world_size": 1, "zero_stage": 0}
    if checksums:
        meta["files"] = {p.name: v for p, v in file_checksums(sorted(path.iterdir())).items()}
    (path / MARKER).write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "size"),
        (lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])), "checksum"),
        (lambda f: f.unlink(), "missing"),
    ],
)
def test_the_check_names_the_file_and_what_is_wrong(tmp_path, damage, reason):
    path = fake_checkpoint(tmp_path, 4)
    assert check_checkpoint(path) == (None, True)
    damage(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    found, verified = check_checkpoint(path)
    assert verified and found is not None
    assert (found.file, found.reason) == ("zero_pp_rank_0_mp_rank_00_optim_states.pt", reason)
    # two ranks' shares cover every file once: the damage is in exactly one of them
    assert sum(check_checkpoint(path, rank, 2)[0] is not None for rank in (0, 1)) == 1


def test_a_marker_without_checksums_is_accepted_when_its_files_open(tmp_path):
    path = fake_checkpoint(tmp_path, 4, checksums=False)
    assert check_checkpoint(path) == (None, False)
    optimizer = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])  # a truncated zip: its directory is at the end
    found, _ = check_checkpoint(path)
    assert found is not None and (found.file, found.reason) == (optimizer.name, "unreadable")


def test_auto_sets_damaged_ones_aside_resumes_from_an_intact_one_or_refuses(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=run"])
    root = cfg.run_dir / "checkpoints"
    older, newer = fake_checkpoint(root, 4), fake_checkpoint(root, 8)
    (newer / "mp_rank_00_model_states.pt").write_bytes(b"short")
    choice = find_resume(cfg)
    assert choice.path == older and choice.verified
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000008.damaged-size"]
    assert len(choice.set_aside) == 1 and "step_00000008.damaged-size" in choice.set_aside[0]
    (older / "synsets.txt").write_text("changed")
    with pytest.raises(CheckpointDamaged) as refused:  # never silently from scratch: exit 2, one line
        find_resume(cfg)
    assert refused.value.exit_code == 2 and "\n" not in str(refused.value)
    assert "step_00000004" in str(refused.value) and "step_00000008" in str(refused.value)
    with pytest.raises(CheckpointDamaged):  # the rerun too, though nothing complete is left
        find_resume(cfg)
    assert find_resume(load_config(None, [f"out_dir={tmp_path}", "name=run", "checkpoint.resume=none"])).path is None


def test_the_export_checks_before_it_reads(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"short")
    with pytest.raises(CheckpointDamaged, match="mp_rank_00_model_states.pt"):
        consolidated_state_dict(path)


def test_storage_failures_are_told_apart_from_other_errors():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("basic_ios::clear: iostream error") from e
    except RuntimeError as wrapped:
        assert storage_failure(wrapped) == "no space left on device"
    assert storage_failure(OSError(errno.EDQUOT, "quota")) == "disk quota exceeded"
    assert "file write failed" in str(
        storage_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    )
    assert storage_failure(OSError(errno.ENOENT, "gone")) is None
    assert storage_failure(ValueError("a bug")) is None


# -- a real run, damaged between launches ----------------------------------------------------------------------


def mlflow_tags(run_dir: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "mlflow_run.json").read_text())
    return dict(MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.tags)


@pytest.fixture(scope="module")
def damaged_runs(shards, tmp_path_factory):
    """One 2-rank run, launched three times (a checkpoint every 4 steps, keep_last=2, tracked in its local store):
    0. to step 12;
    1. step 12's optimizer file of rank 0 truncated; relaunched to step 16;
    2. step 16's marker stripped of its checksums (as markers before them were) and its module file replaced by
       a torch file of something else (it opens, it does not load); relaunched to step 20."""
    out = tmp_path_factory.mktemp("integrity")
    run_dir = out / "run"

    def launch(steps: int) -> subprocess.CompletedProcess:
        cmd = small(
            shards,
            out,
            "run",
            f"train.max_steps={steps}",
            "checkpoint.every_steps=4",
            "checkpoint.keep_last=2",
            "tracking.system_metrics=false",
            tracked=True,
        )
        return run(["bash", LAUNCH, *cmd], check=False)

    phases: dict = {0: launch(12)}
    ckpt = run_dir / "checkpoints"
    phases["markers"] = {p.name: json.loads((p / MARKER).read_text()) for p in ckpt.glob("step_*")}
    phases["listing"] = {p.name: sorted(f.name for f in p.iterdir()) for p in ckpt.glob("step_*")}
    optimizer = ckpt / "step_00000012" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    phases[1] = launch(16)
    phases["after_1"] = sorted(p.name for p in ckpt.iterdir())
    phases["tags_1"] = mlflow_tags(run_dir)
    newest = ckpt / "step_00000016"
    meta = json.loads((newest / MARKER).read_text())
    del meta["files"], meta["checksum"]
    (newest / MARKER).write_text(json.dumps(meta))
    torch.save({"something": torch.zeros(2)}, newest / "mp_rank_00_model_states.pt")
    assert zipfile.is_zipfile(newest / "mp_rank_00_model_states.pt")
    phases[2] = launch(20)
    phases["after_2"] = sorted(p.name for p in ckpt.iterdir())
    phases["records"] = records(run_dir)
    return phases


@pytest.mark.slow
def test_every_file_of_a_checkpoint_has_its_size_and_checksum_in_the_marker(damaged_runs):
    first = damaged_runs[0]
    assert first.returncode == 0, first.stderr[-5000:]
    assert set(damaged_runs["markers"]) == {"step_00000008", "step_00000012"}  # keep_last=2
    for name, meta in damaged_runs["markers"].items():
        listed = set(damaged_runs["listing"][name]) - {MARKER}
        assert set(meta["files"]) == listed, name
        assert all(entry["size"] > 0 and len(entry["checksum"]) == 64 for entry in meta["files"].values())


@pytest.mark.slow
def test_a_truncated_file_is_set_aside_and_the_run_resumes_from_the_one_before(damaged_runs):
    second = damaged_runs[1]
    assert second.returncode == 0, second.stderr[-5000:]
    resumed = [r for r in damaged_runs["records"] if "resumed_from" in r]
    assert resumed[0]["resumed_from"].endswith("step_00000008") and resumed[0]["step"] == 8
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in resumed[0]["set_aside"][0]
    assert "step_00000012.damaged-size" in damaged_runs["after_1"]
    tags = damaged_runs["tags_1"]
    assert tags["swin.resumed_from"].endswith("step_00000008") and "step_00000012" in tags["swin.checkpoints_set_aside"]
    # keep_last=2 after saves at 12 and 16: step 8, which the run resumed from after its check, is kept too
    assert {"step_00000008", "step_00000012", "step_00000016"} <= set(damaged_runs["after_1"])
    losses = [r["step"] for r in damaged_runs["records"] if "loss" in r]
    assert losses.count(9) == 2 and losses.count(12) == 2  # steps 9-12 trained again


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_load_is_set_aside_like_a_damaged_one(damaged_runs):
    third = damaged_runs[2]
    assert third.returncode == 0, third.stderr[-5000:]
    resumed = [r for r in damaged_runs["records"] if "resumed_from" in r]
    assert resumed[1]["resumed_from"].endswith("step_00000012") and resumed[1]["step"] == 12
    assert "does not load" in resumed[1]["set_aside"][0]
    assert "step_00000016.damaged-load" in damaged_runs["after_2"]
    assert max(r["step"] for r in damaged_runs["records"] if "loss" in r) == 20
