"""Training for real on CPU (gloo, 2 ranks): ZeRO 1/2/3 through launch/pretrain_22k.sh, the `deepspeed`
launcher calling the script both ways, exact resume after `kill -9` (also mid-checkpoint), export that
reproduces the engine's evaluation, and a diverging run that stops with a checkpoint from before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.engine.model_export import load_exported
from runs import (
    DEEPSPEED,
    LAUNCH,
    SBATCH,
    checkpoint_record,
    job_env,
    metrics,
    newest_complete,
    one_node_two_tasks,
    rank_records,
    run,
    sbatch_env,
    small,
)
from servers import REPO, free_port

pytestmark = pytest.mark.slow
# Each ZeRO stage's run starts the script a different way: `bash launch/pretrain_22k.sh`, and the `deepspeed`
# launcher running it as `python -u launch/pretrain_22k.sh` or, with --no_python, as a program. One launch per
# stage serves both checks (a launch costs ~20 s here, nearly all of it start-up), and the ZeRO-3 run is also
# the one whose export is checked against the engine's evaluation.
FORMS = {1: "bash", 2: "deepspeed", 3: "deepspeed_no_python"}


@pytest.fixture(scope="module")
def zero_runs(shards, tmp_path_factory):
    """zero_runs(stage) -> (run folder, the launch's CompletedProcess): 24 steps at ZeRO `stage` on 2 ranks,
    started the FORMS[stage] way; run once per module."""
    done: dict[int, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(stage: int):
        if stage not in done:
            out = tmp_path_factory.mktemp(f"zero{stage}")
            args = small(
                shards,
                out,
                f"zero{stage}",
                f"train.zero_stage={stage}",
                "train.max_steps=24",
                "optim.base_lr=1e-2",
                "checkpoint.every_steps=12",
            )
            launcher = {
                "bash": ["bash"],
                "deepspeed": [DEEPSPEED, "--num_gpus", 2, "--master_port", free_port()],
                "deepspeed_no_python": [DEEPSPEED, "--num_gpus", 2, "--master_port", free_port(), "--no_python"],
            }[FORMS[stage]]
            done[stage] = out / f"zero{stage}", run([*launcher, LAUNCH, *args])
        return done[stage]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_on_two_ranks_and_the_loss_falls(stage, zero_runs):
    run_dir, proc = zero_runs(stage)
    steps, evals = metrics(run_dir)
    losses = [m["loss"] for m in steps]
    assert [m["step"] for m in steps] == list(range(1, 25))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert evals[-1]["val_samples"] == 100
    ckpt = run_dir / "checkpoints" / "step_00000024"
    complete = json.loads((ckpt / "COMPLETE").read_text())
    assert complete["zero_stage"] == stage and complete["world_size"] == 2  # two ranks trained and saved together
    optim_files = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert len(optim_files) == 2, optim_files  # one optimizer partition per rank
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert (run_dir / "model" / "model.safetensors").is_file()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the machine's cores shared by its 2 ranks
    assert f"{threads} CPU threads per rank" in proc.stderr, proc.stderr[-3000:]  # recorded nowhere else
    # `deepspeed launch/pretrain_22k.sh ...` runs each rank as `python -u launch/pretrain_22k.sh`; with
    # --no_python it runs the file as a program: either way the script starts its rank, which its heartbeat says
    assert sorted(rank_records(run_dir)) == [0, 1]


@pytest.mark.parametrize("procs", [1, 2, 8])
def test_one_machine_launch_gives_the_launcher_the_runners_world_info(procs):
    """launch/pretrain_22k.sh on one machine starts DeepSpeed's per-node launcher without its runner: the world
    info it hands over is the runner's encoding of this machine's ranks."""
    from deepspeed.launcher.runner import encode_world_info

    from swin_common.node_launch import launcher_argv

    argv = launcher_argv(["--procs", str(procs), "--master_port", "29511", "--module", "pipeline.train", "a=1"])
    assert argv == [
        f"--world_info={encode_world_info({'localhost': list(range(procs))})}",
        "--master_port",
        "29511",
        "--module",
        "pipeline.train",
        "a=1",
    ]
    with pytest.raises(SystemExit, match="give --procs N first"):
        launcher_argv(["--module", "pipeline.train"])


def start_in_session(cmd: list) -> subprocess.Popen:
    return subprocess.Popen(
        list(map(str, cmd)),
        cwd=REPO,
        env=job_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The first path in folder matching the glob pattern, once one exists (the run must still be going)."""
    end = time.time() + timeout
    while not (found := sorted(folder.glob(pattern)) if folder.is_dir() else []):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {folder / pattern} appeared"
        assert time.time() < end, f"{folder / pattern} did not appear in {timeout}s"
        time.sleep(0.005)
    return found[0]


def test_resume_after_kill_9_gives_the_uninterrupted_weights(shards, tmp_path):
    """Killed (-9, the whole process tree) right after the step-4 checkpoint, then again while a later
    checkpoint is being written; each restart resumes from the newest complete checkpoint, and the final
    weights equal an uninterrupted run's bit for bit (CPU, same world size). Mixup/CutMix, random erasing
    and drop path all draw random numbers, so the RNG and loader states must come back exactly; gradients
    are accumulated over 2 micro batches, so checkpoints must fall on step boundaries."""
    args = [
        "train.global_batch=64",
        "train.max_steps=9",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "model.drop_path=0.2",  # 64 = 16 per rank x 2 ranks x 2 accumulated micro batches
        "data.mixup=0.8",
        "data.cutmix=1.0",
        "data.random_erasing=0.25",
        "schedule.warmup_epochs=0.1",
    ]
    run(["bash", LAUNCH, *small(shards, tmp_path, "straight", *args)])

    ckpts = tmp_path / "killed" / "checkpoints"
    cmd = ["bash", LAUNCH, *small(shards, tmp_path, "killed", *args)]
    proc = start_in_session(cmd)
    wait_for(ckpts, "step_00000004/COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start_in_session(cmd)
    # killed while a later checkpoint (step 6 or 8, whichever the poll sees) is being written
    wait_for(ckpts, ".tmp-step_*", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    final_names = [p for p in ckpts.iterdir() if p.name.startswith("step_")]
    assert all((p / "COMPLETE").is_file() for p in final_names), "a checkpoint under its final name is incomplete"
    resumed_from = newest_complete(tmp_path / "killed")
    newest = checkpoint_record(resumed_from)["step"]
    before = len(metrics(tmp_path / "killed")[0])
    run(cmd)
    # resumed from the newest complete checkpoint: the last job's records go on from its step
    assert [m["step"] for m in metrics(tmp_path / "killed")[0][before:]] == list(range(newest + 1, 10))

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # the last record's training values alike; its clock readings (time, throughput, where the time went) are not
    clocks = (
        "time",
        "images_per_s",
        "images_per_s_per_rank",
        "step_s",
        "own_s_median",
        "own_s_max",
        "slowest_rank",
        "data_wait_s",
        "data_wait_pct",
        "checkpoint_s",
        "eval_s",
    )

    def trained(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in clocks}

    assert trained(metrics(tmp_path / "straight")[0][-1]) == pytest.approx(trained(metrics(tmp_path / "killed")[0][-1]))
    # keep_last=2, no temporaries left; and the checkpoint the run resumed from, the newest that passed a check
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == sorted(
        {resumed_from.name, "step_00000008", "step_00000009"}
    )


def test_export_reproduces_the_engine_evaluation(zero_runs, shards, tmp_path):
    """The exported safetensors, loaded into a fresh timm model, give the val loss and accuracy the DeepSpeed
    engine measured at the end of training (ZeRO-3: the weights are merged from both ranks' partitions)."""
    run_dir, _ = zero_runs(3)
    engine_eval = metrics(run_dir)[1][-1]
    model, meta = load_exported(run_dir / "model")
    assert meta["timm_name"] == "swin_nano_patch4_window4_64" and len(meta["synsets"]) == 10
    loader = create_loader(
        LoaderConfig(
            shards=str(shards), split="val", train=False, batch_size=50, image_size=64, crop_pct=1.0, workers=1
        )
    )
    loss, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits += (logits.argmax(1) == labels).sum().item()
            n += len(labels)
    assert n == engine_eval["val_samples"]
    assert 100 * hits / n == engine_eval["val_top1"]
    assert loss / n == pytest.approx(engine_eval["val_loss"], rel=1e-5)

    # the same export by hand, from the checkpoint folder
    run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            run_dir / "checkpoints" / "step_00000024",
            "--out",
            tmp_path / "by_hand",
        ]
    )
    by_hand = load_file(tmp_path / "by_hand" / "model.safetensors")
    assert all(torch.equal(by_hand[k], v) for k, v in model.state_dict().items())
    bad = run([sys.executable, "-m", "pipeline.export", tmp_path, "--out", tmp_path / "x"], check=False)
    assert bad.returncode == 2 and "not a complete checkpoint" in bad.stderr


def evaluate_like_the_engine(model, shards: Path, stage: int, device: str = "cpu", world: int = 2) -> dict:
    """The export evaluated as the bf16 engine evaluated: the same `world` rank slices in batches of 50 (the same
    shapes, so the same kernels), bf16 images, and the weights as the engine holds them: rounded to bf16 at
    ZeRO 1-3, fp32 under autocast at ZeRO-0; at ZeRO-3 with DeepSpeed's linear (its engine replaces
    F.linear by zero3_linear_wrap: matmul, then the bias, rounded apart). Sums as pipeline.engine.validation does."""
    import contextlib
    from unittest import mock

    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from pipeline.engine.validation import batch_sums

    model = model.to(device) if stage == 0 else model.to(device, torch.bfloat16)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for rank in range(world):
        loader = create_loader(
            LoaderConfig(
                shards=str(shards),
                split="val",
                train=False,
                batch_size=50,
                image_size=64,
                crop_pct=1.0,
                workers=1,
                dtype="bfloat16",
                device=device,
            ),
            rank,
            world,
        )
        linear = mock.patch("torch.nn.functional.linear", zero3_linear_wrap) if stage == 3 else contextlib.nullcontext()
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=stage == 0), linear:
            for images, labels in loader:
                sums += batch_sums(model(images.to(device)).float(), labels.to(device))
    total = sums.tolist()
    return {"val_loss": total[0] / total[3], "val_top1": 100 * total[1] / total[3], "val_samples": int(total[3])}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_trains_resumes_and_exports_its_fp32_masters_at_every_zero_stage(stage, shards, tmp_path):
    """bf16 on DeepSpeed's CPU accelerator, 2 ranks: train -> checkpoint -> kill -9 -> resume -> eval -> export.
    The export holds the fp32 master weights (low mantissa bits set; ZeRO-0 used to export its bf16 module), and
    evaluated as the engine evaluated (evaluate_like_the_engine) it gives the engine's own top-1 exactly and its
    loss to rounding of the sums, a comparison that cannot flake."""
    cmd = [
        "bash",
        LAUNCH,
        *small(
            shards,
            tmp_path,
            "bf16",
            f"train.zero_stage={stage}",
            "train.precision=bf16",
            "train.max_steps=4",
            "checkpoint.every_steps=2",
            "optim.base_lr=1e-2",
        ),
    ]
    proc = start_in_session(cmd)
    wait_for(tmp_path / "bf16" / "checkpoints", "step_00000002/COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(metrics(tmp_path / "bf16")[0])
    run(cmd)
    steps, evals = metrics(tmp_path / "bf16")
    assert [m["step"] for m in steps[before:]] == [3, 4]  # resumed from the step-2 checkpoint
    assert all(m["loss"] == m["loss"] for m in steps)
    assert not {"mfu", "mem_peak_allocated_gb", "alloc_retries"} & set(steps[-1])  # GPU fields: absent on CPU
    assert evals[-1]["step"] == 4 and evals[-1]["val_samples"] == 100

    model, _meta = load_exported(tmp_path / "bf16" / "model")
    weights = model.state_dict()
    rounded = sum(torch.equal(v, v.bfloat16().float()) for v in weights.values() if v.numel() > 16)
    assert rounded <= 1, f"{rounded} exported tensors hold bf16 values only: the export read rounded weights"
    if stage in (1, 2):  # the engine's bf16 module is the fp32 master, rounded
        module = torch.load(
            tmp_path / "bf16" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )["module"]
        assert all(torch.equal(module[k], v.bfloat16()) for k, v in weights.items())
    ours = evaluate_like_the_engine(model, shards, stage)
    assert ours["val_samples"] == 100 and ours["val_top1"] == evals[-1]["val_top1"]
    assert ours["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_a_gpu_trains_exports_and_evaluates_alike(shards, tmp_path):
    """One GPU rank (process group cpu:gloo,cuda:nccl, DALI mixed decode, bf16, ZeRO-2): the loss is finite, and
    the export evaluated on the GPU as the engine evaluated gives the engine's top-1 exactly."""
    run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            *small(shards, tmp_path, "bf16", "train.precision=bf16", "train.max_steps=6", "train.global_batch=16"),
        ]
    )
    train_rows, evals = metrics(tmp_path / "bf16")
    assert all(r["loss"] == r["loss"] for r in train_rows) and evals[-1]["val_samples"] == 100
    assert all("mfu" not in r or 0 < r["mfu"] < 1 for r in train_rows) and "mem_peak_allocated_gb" in train_rows[-1]
    model, _meta = load_exported(tmp_path / "bf16" / "model")
    ours = evaluate_like_the_engine(model, shards, stage=2, device="cuda", world=1)
    assert ours["val_samples"] == 100 and ours["val_top1"] == evals[-1]["val_top1"]
    assert ours["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_at_zero0_keeps_its_loss_scale_across_a_resume(shards, tmp_path):
    """ZeRO-0 fp16 runs as autocast with torch's GradScaler, whose state DeepSpeed does not save: the rank file
    holds it, the logged loss scale is the scaler's, and the resumed run continues from it."""
    args = ["train.precision=fp16", "train.zero_stage=0", "train.global_batch=16", "checkpoint.every_steps=2"]
    run([sys.executable, "-m", "pipeline.train", *small(shards, tmp_path, "fp16z0", *args, "train.max_steps=2")])
    own = torch.load(tmp_path / "fp16z0" / "checkpoints" / "step_00000002" / "rank_00000.pt", weights_only=True)
    steps, _ = metrics(tmp_path / "fp16z0")
    assert own["grad_scaler"]["scale"] == steps[-1]["loss_scale"]
    run([sys.executable, "-m", "pipeline.train", *small(shards, tmp_path, "fp16z0", *args, "train.max_steps=4")])
    steps, _ = metrics(tmp_path / "fp16z0")
    assert steps[-1]["step"] == 4 and steps[2]["loss_scale"] <= 2 * steps[1]["loss_scale"]
    assert 0 <= steps[-1]["skipped_steps"] <= 4  # GradScaler's skips, counted from AdamW's own step count


def test_a_diverging_run_stops_with_a_checkpoint_from_before(shards, tmp_path):
    """An absurd LR overflows the weights: non-finite losses are dropped and counted, then the run stops with
    an error naming the checkpoint written before the first one (world of one, `python -m pipeline.train`)."""
    proc = run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            *small(
                shards,
                tmp_path,
                "nan",
                "optim.base_lr=1e33",
                "optim.grad_clip=0",
                "train.max_bad_steps=3",
                "checkpoint.every_steps=1000",
                "train.global_batch=16",
            ),
        ],
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "the loss was not finite for 4 micro batches in a row since step" in proc.stderr
    first_bad = int(proc.stderr.split("in a row since step ")[1].split()[0])
    ckpt = tmp_path / "nan" / "checkpoints" / f"step_{first_bad:08d}"
    assert f"newest checkpoint from before it: {ckpt}" in proc.stderr
    assert json.loads((ckpt / "COMPLETE").read_text())["step"] == first_bad
    assert "non-finite loss at step" in proc.stderr


@pytest.mark.slurm
def test_slurm_sbatch_trains_with_srun_ranks(slurm_cluster, shards, tmp_path):
    """launch/slurm/pretrain_22k.sbatch on the one-node cluster: srun starts 2 tasks, each maps Slurm's
    variables to its rank (no launcher, no ssh), and the run trains and checkpoints."""
    job = slurm_cluster.sbatch(
        SBATCH,
        *small(shards, tmp_path, "slurm", "train.max_steps=3"),
        sbatch_args=one_node_two_tasks(tmp_path),
        env=sbatch_env(),
        cwd=tmp_path,
    )
    [state] = slurm_cluster.wait(job, timeout=600)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert state.ok, f"{state}\n{log[-5000:]}"
    beats = rank_records(tmp_path / "slurm")  # 2 ranks, on one node
    assert sorted(beats) == [0, 1] and len({b["address"] for b in beats.values()}) == 1, beats
    steps, evals = metrics(tmp_path / "slurm")
    assert steps[-1]["step"] == 3 and evals
    assert len(list((tmp_path / "slurm" / "checkpoints" / "step_00000003").glob("rank_*.pt"))) == 2


def test_slurm_variables_become_the_torch_ones():
    from pipeline.engine.distributed import environment_from_slurm

    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_NODELIST": "gpu07,gpu08",
    }
    assert environment_from_slurm(srun) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 1234),
    }
    assert environment_from_slurm({**srun, "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
    }
    assert environment_from_slurm({**srun, "RANK": "0"}) == {}  # a launcher already set it
    assert environment_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == {}  # a batch script, not srun
