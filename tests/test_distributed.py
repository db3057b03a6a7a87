"""Cluster-correct by construction, checked on CPU: the process-group backend a GPU machine gets, the GPU each
rank drives under every launcher, per-rank random streams that batch seeding never replaces, and evaluation
that counts every val sample exactly once whatever the world size (real gloo ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_prep
from pipeline.data.augment_params import seeded, torch_generators
from pipeline.engine.distributed import cpu_threads, cuda_device_index, process_group_backend, rank_environment
from servers import free_port


# -- 1. collectives on every device --------------------------------------------------------------------------
def test_a_gpu_machine_gets_nccl_for_cuda_tensors_and_gloo_for_cpu_ones():
    from torch.distributed.distributed_c10d import BackendConfig

    assert process_group_backend(cuda=False) == "gloo"
    backends = BackendConfig(process_group_backend(cuda=True)).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}  # torch parses it as one group serving both devices


LAUNCHERS = {
    # what each launcher puts in a rank's environment (the second rank of the second node, 4 ranks per node)
    "deepspeed": {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
    },
    "torchrun": {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "none",
    },
    "accelerate": {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "ACCELERATE_USE_DEEPSPEED": "false",
    },
    "srun": {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "n1,n2",
        "MASTER_ADDR": "n1",
        "SLURM_CPUS_PER_TASK": "8",
    },
    "openmpi": {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
    },
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_every_launcher_gives_the_rank_and_the_gpu_of_its_local_rank(launcher):
    env = rank_environment(LAUNCHERS[launcher])
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert cuda_device_index(env, device_count=4) == 1  # torch.cuda.set_device(1); DALI's device_id follows


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_every_launcher_shares_the_nodes_cores_among_its_ranks(launcher):
    """4 ranks on a 32-core node: 8 intra-op threads each (torch's default would give each rank all 32); a user's
    OMP_NUM_THREADS wins; a rank alone on its node keeps torch's default."""
    assert cpu_threads(LAUNCHERS[launcher], cores=32) == 8
    assert cpu_threads({**LAUNCHERS[launcher], "OMP_NUM_THREADS": "3"}, cores=32) is None
    assert cpu_threads({"LOCAL_SIZE": "4"}, cores=2) == 1
    assert cpu_threads({}, cores=32) is None and cpu_threads({"LOCAL_WORLD_SIZE": "1"}, cores=32) is None


def test_no_launcher_is_a_world_of_one_and_too_many_ranks_per_node_is_an_error():
    assert rank_environment({}) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=8 but this node has 8 visible GPU\(s\)"):
        cuda_device_index({"LOCAL_RANK": "8"}, device_count=8)


MIXED = """
import os, torch, torch.distributed as dist
from pipeline.engine.distributed import init_distributed, shutdown
world = init_distributed()  # on a GPU machine: cpu:gloo,cuda:nccl
assert dist.get_backend() == "cpu:gloo,cuda:nccl", dist.get_backend()
gpu, cpu = torch.ones(3, device="cuda"), torch.ones(3)
dist.all_reduce(gpu)  # NCCL
dist.all_reduce(cpu)  # gloo, in the same process group
box = [{"run": "id"}]
dist.broadcast_object_list(box)
dist.barrier()
assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu) and box[0] == {"run": "id"}
assert torch.cuda.current_device() == int(os.environ["LOCAL_RANK"])
shutdown()
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_process_group_carries_cuda_and_cpu_tensors():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", MIXED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **env,
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# -- 2. random streams ------------------------------------------------------------------------------------------
def test_batch_seeding_restores_the_generators_it_seeds_and_touches_no_other():
    drop_path = torch.Generator().manual_seed(1234)  # stands for another device's generator, e.g. a CUDA one
    mine = torch.Generator().manual_seed(99)  # stands for the batch's device generator
    before = drop_path.get_state(), mine.get_state(), torch.random.get_rng_state()
    draws = []
    for _ in range(2):
        with seeded(np.random.default_rng([0, 1, 2]), [torch.default_generator, mine]):
            draws.append(
                (torch.rand(3), torch.rand(3, generator=mine), np.random.rand(), __import__("random").random())
            )
    assert (
        all(torch.equal(a, b) for a, b in zip(draws[0][:2], draws[1][:2], strict=True)) and draws[0][2:] == draws[1][2:]
    )
    assert torch.equal(drop_path.get_state(), before[0])  # not named: never reseeded (torch.manual_seed would)
    assert torch.equal(mine.get_state(), before[1]) and torch.equal(torch.random.get_rng_state(), before[2])
    assert torch_generators("cpu") == [torch.default_generator]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_seeding_on_cuda_keeps_every_devices_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.manual_seed_all(7)
    states = torch.cuda.get_rng_state_all()
    with seeded(np.random.default_rng(0), torch_generators(device)):
        torch.rand(3, device=device)
    assert all(torch.equal(a, b) for a, b in zip(states, torch.cuda.get_rng_state_all(), strict=True))


# -- 3. evaluation counts every sample once ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_val_set(digits_folder, tmp_path_factory):
    """33 val samples (11 classes x 3): no world size of 2 or more divides them."""
    root = tmp_path_factory.mktemp("odd")
    source = shutil.copytree(digits_folder, root / "source")
    extra = source / "n00000010"
    extra.mkdir()
    for p in sorted((source / "n00000000").iterdir())[:12]:
        shutil.copy(p, extra / p.name)
    run_prep("shard", "--source", source, "--out", root / "set", "--holdout-per-class", 3, "--max-samples", 7)
    return root / "set"


@pytest.mark.parametrize("world", [2, 3])
def test_val_loaders_give_every_sample_to_exactly_one_rank(odd_val_set, world):
    from pipeline.data.loader import LoaderConfig, create_loader

    cfg = LoaderConfig(
        shards=str(odd_val_set), split="val", train=False, batch_size=4, image_size=64, backend="torch", workers=0
    )
    whole = [(x, y) for images, labels in create_loader(cfg) for x, y in zip(images, labels, strict=True)]
    assert len(whole) == 33 and all(y >= 0 for _, y in whole)
    parts = [
        [(x, y) for images, labels in create_loader(cfg, r, world) for x, y in zip(images, labels, strict=True)]
        for r in range(world)
    ]
    assert len({len(p) for p in parts}) == 1  # the same number of batches and entries on every rank
    real = [(x, y) for p in parts for x, y in p if y >= 0]
    assert len(real) == 33 and all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(whole, real, strict=True))


EVAL = """
import json, sys, torch
from pipeline.data.loader import LoaderConfig, create_loader
from pipeline.engine.distributed import init_distributed, shutdown
from pipeline.engine.validation import evaluate
from pipeline.model import create_model
world = init_distributed()
torch.manual_seed(0)  # the same weights in every process
model = create_model("swin_nano", 64, 4, 11)
loader = create_loader(LoaderConfig(shards=sys.argv[1], split="val", train=False, batch_size=4, image_size=64,
                                    backend="torch", workers=0), world.rank, world.size)
result = evaluate(model, loader, torch.device("cpu"))
if world.is_main:
    print(json.dumps(result))
shutdown()
"""


def evaluate_on(world: int, shards) -> dict:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EVAL, str(shards)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


@pytest.mark.slow
def test_the_same_weights_evaluate_the_same_on_1_and_2_ranks(odd_val_set):
    one, two = evaluate_on(1, odd_val_set), evaluate_on(2, odd_val_set)
    assert one["val_samples"] == two["val_samples"] == 33
    assert one["val_top1"] == two["val_top1"] and one["val_top5"] == two["val_top5"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)  # fp32 sums over other batches: 2e-8 seen


# -- 3. storage every rank sees ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ranks_that_do_not_see_the_run_folder_fail_at_once_naming_it(odd_val_set, tmp_path):
    """Two ranks whose relative out_dir resolves to different folders (as on node-local disks) stop at start with
    an error that names the folder, before any training."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = []
    for r in range(2):
        node = tmp_path / f"node{r}"
        node.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline.train",
                    "--config",
                    str(REPO / "configs" / "tiny_22k.yaml"),
                    "out_dir=runs",
                    f"data.shards={odd_val_set}",
                    "tracking.enabled=false",
                ],
                cwd=node,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={
                    **base,
                    "PYTHONPATH": str(REPO),
                    "RANK": str(r),
                    "WORLD_SIZE": "2",
                    "LOCAL_RANK": str(r),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "SWIN_RANK_GRACE_S": "0",
                },
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outs]
    rank0 = outs[0][1]
    assert f"rank(s) 1 do not see {tmp_path / 'node0' / 'runs' / 'tiny_22k' / '.ranks-see-this'}" in rank0, rank0
    assert "Traceback" not in rank0 and not (tmp_path / "node0" / "runs" / "tiny_22k" / "checkpoints").exists()


# -- 4. MLflow's local store is for one machine ---------------------------------------------------------------
@pytest.mark.slow
def test_a_multi_node_job_without_a_tracking_server_refuses_naming_the_script(odd_val_set, tmp_path):
    port = str(free_port())
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "--config",
                str(REPO / "configs" / "tiny_22k.yaml"),
                f"out_dir={tmp_path}",
                f"data.shards={odd_val_set}",
            ],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "SWIN_RANK_GRACE_S": "0",
                "SWIN_NODE_NAME": f"node{r}",
            },
        )  # one rank on each of two "nodes"
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outs]
    errors = [line for line in outs[0][1].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "runs on 2 nodes (node0, node1)" in errors[0], outs[0][1][-2000:]
    assert "scripts/start_mlflow_server.sh" in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    assert not (tmp_path / "mlflow").exists()  # no SQLite file written from either "node"


# -- 5. timeouts that fit the work ------------------------------------------------------------------------------
WAIT = r"""
import sys, time
from pipeline.engine.distributed import barrier, init_distributed, shutdown, wait_for_main
how, rank0_s = sys.argv[1], float(sys.argv[2])
world = init_distributed(timeout_s=2, long_timeout_s=120)  # every collective: 2 s (train.collective_timeout_s)
if world.is_main:
    time.sleep(rank0_s)  # rank 0's long work: the export and registration, a universal conversion
t0 = time.monotonic()
try:
    (wait_for_main("the test's long section", progress_s=2) if how == "wait_for_main" else barrier())
    print(f"passed after {time.monotonic() - t0:.1f} s", flush=True)
finally:
    shutdown()
"""


def run_ranks(code: str, *args: str, world: int = 2, timeout: float = 120) -> list[tuple[int, str, str]]:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.slow
def test_rank0_work_longer_than_the_collective_timeout_is_waited_for():
    """The collective timeout is 2 s; rank 0 works 6 s while rank 1 waits: wait_for_main (the long-wait gloo
    group) passes and says it still waits, where a plain barrier of the process group times out."""
    (rc0, out0, err0), (rc1, out1, err1) = run_ranks(WAIT, "wait_for_main", "6")
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    assert float(out1.split()[-2]) >= 5, out1
    assert "still waiting for rank 0 to finish the test's long section" in err1, err1[-2000:]
    (_rc0, _out0, _err0), (rc1, out1, err1) = run_ranks(WAIT, "barrier", "6")
    assert rc1 != 0 and "passed" not in out1, out1 + err1[-2000:]  # the timeout is real: the test could fail
    assert "timed out" in err1.lower() or "timeout" in err1.lower(), err1[-2000:]


def test_nccl_gets_async_error_handling_and_a_flight_recorder_dumping_into_the_run_folder(tmp_path):
    from pipeline.engine.distributed import nccl_environment

    env = nccl_environment(str(tmp_path / "run" / "nccl_traces"))
    assert env == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "run" / "nccl_traces" / "rank_"),
    }
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" not in nccl_environment(None)  # no folder, no dump
