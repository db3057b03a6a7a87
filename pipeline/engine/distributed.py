"""Process-group setup for the ways a rank is started:

- the `deepspeed` launcher, torchrun and `accelerate launch`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT are set;
- Slurm's `srun`, one task per GPU: DeepSpeed never reads SLURM_*, so they are mapped here (the master is the
  first host of the job's node list, the port derived from the job id unless MASTER_PORT is set);
- `mpirun` (OpenMPI, or DeepSpeed's `--launcher openmpi`): OMPI_COMM_WORLD_* are mapped the same way;
- a plain `python -m pipeline.train`: a world of one.

Each rank drives the GPU of its LOCAL_RANK, or the only GPU it sees when Slurm binds one per task
(torch.cuda.set_device here; DALI's device_id is the current device), after checking that the installed torch
has kernels for it (swin_common.gpu).
The process group is `cpu:gloo,cuda:nccl` on GPU machines (process_group_backend): NCCL carries CUDA tensors
(gradients, ZeRO partitions, evaluation sums, the loss tallies and finite-loss flags, which stay where the GPU
computed them), gloo the CPU values (object broadcasts, barriers).

Importing DeepSpeed picks its accelerator once, so DS_ACCELERATOR is set to `cpu` first where there is no GPU.

Timeouts: every collective of the process group gives up after `train.collective_timeout_s` (DeepSpeed's own
default is 10 minutes), so a rank that died or stopped answering ends the job in that time. Work that only rank 0
does while the others wait (the export and registration at the end, the universal-checkpoint conversion of an
elastic resume) is waited for with `wait_for_main`: a barrier of a second gloo group whose timeout is
`train.long_wait_timeout_s`, never the process group's (under NCCL a barrier runs on the device and aborts at
its timeout). On GPUs, NCCL's async error handling and flight recorder are on (`nccl_environment`), the traces
going to the run folder.

Every collective the project runs goes through the helpers at the end of this module (all_reduce_sum,
all_true, barrier, broadcast_object, all_gather_object, shutdown), so the rules of the process group's backends live in
one place;
each is a no-op in a world of one or without a process group.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from swin_common.errors import UserError
from swin_common.gpu import check_torch_kernels, current_gpu, torch_arch_list

log = logging.getLogger(__name__)
_long_group: dist.ProcessGroup | None = None  # the gloo group wait_for_main waits on (long timeout)


class LaunchError(UserError, RuntimeError):
    """Ranks started in a way that cannot work on this node (more ranks than GPUs, ...)."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables a Slurm task lacks, from Slurm's own (empty when not under srun)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost"))
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def environment_from_mpi(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables of an OpenMPI rank (mpirun, `deepspeed --launcher openmpi`)."""
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" not in env:
        return {}
    return {
        "RANK": env["OMPI_COMM_WORLD_RANK"],
        "WORLD_SIZE": env.get("OMPI_COMM_WORLD_SIZE", "1"),
        "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
    }


def rank_environment(env: dict[str, str]) -> dict[str, str]:
    """This process's RANK, WORLD_SIZE and LOCAL_RANK, whichever launcher started it.

    RANK, WORLD_SIZE and LOCAL_RANK of this process, whichever launcher started it (a world of one when none
    did), plus MASTER_* where a launcher's own variables give them."""
    out = {**env, **environment_from_slurm(env), **environment_from_mpi(env)}
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        out.setdefault(key, default)
    return {k: out[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in out}


def cuda_device_index(env: dict[str, str], device_count: int) -> int:
    """The GPU this rank drives.

    One visible GPU is device 0: Slurm binds one GPU per task (`srun
    --gpus-per-task=1`, `--gpu-bind=single:1`) and each task sees only its own while SLURM_LOCALID runs 0-7.
    Several visible GPUs: the one of this rank's LOCAL_RANK, which must name one of them."""
    local = int(env.get("LOCAL_RANK", "0"))
    if device_count == 1:
        return 0
    if not 0 <= local < device_count:
        raise LaunchError(
            f"LOCAL_RANK={local} but this node has {device_count} visible GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
            f"{device_count} rank(s) per node, one per GPU, or bind one GPU per task "
            f"(srun --gpus-per-task=1)"
        )
    return local


def process_group_backend(cuda: bool) -> str:
    """The torch.distributed backend for this machine: NCCL plus gloo with GPUs, gloo alone without.

    The backend string for torch.distributed: NCCL for CUDA tensors plus gloo for CPU ones on GPU machines
    (torch routes each collective by its tensor's device), gloo alone on CPU-only machines."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]  # "node[01-04]" without scontrol: best effort


def cpu_threads(env: dict[str, str], cores: int) -> int | None:
    """The intra-op thread count this rank should use, or None to keep torch's default.

    Intra-op threads for a rank whose user set none (OMP_NUM_THREADS, which torch reads itself): the cores it
    may run on, shared among its node's ranks (LOCAL_WORLD_SIZE from torchrun and accelerate, LOCAL_SIZE from
    DeepSpeed's launcher, OMPI_COMM_WORLD_LOCAL_SIZE from mpirun; under srun the task's --cpus-per-task), as
    torchrun and DeepSpeed's --bind_cores_to_rank do. torch's default is every core in every rank: N ranks on a node
    then run N x cores OpenMP threads, which wait
    on each other at every parallel op. None: leave torch's default (one rank, or nothing known)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    if "SLURM_STEP_ID" in env and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(cores, int(env["SLURM_CPUS_PER_TASK"])))
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or "1"
    return max(1, cores // int(local)) if local.isdigit() and int(local) > 1 else None


def prepare_environment() -> None:
    os.environ.update(rank_environment(dict(os.environ)))
    threads = cpu_threads(dict(os.environ), len(os.sched_getaffinity(0)))
    if threads is not None:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"


def nccl_environment(trace_dir: str | None, trace_entries: int = 20000) -> dict[str, str]:
    """The NCCL settings that end a hung job with a record of its last collectives.

    What NCCL's watchdog needs to end a hung job with a record of it (torchtitan's distributed/utils.py sets
    the same): async error handling 3 (the watchdog aborts the communicator and ends the process, without the
    cleanup that can itself hang; the flight recorder needs this mode), a ring of the last collectives per rank,
    dumped on a timeout to `<trace_dir>/rank_N`. Read when the process group starts; a value the user set wins."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": str(trace_entries)}
    if trace_dir and trace_entries > 0:
        env.update(
            {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(trace_dir, "rank_")}
        )
    return env


def init_distributed(
    timeout_s: float | None = None, long_timeout_s: float | None = None, trace_dir: str | None = None
) -> World:
    """Starts the process group and returns this rank's place in it.

    Starts the process group (process_group_backend) through DeepSpeed and returns this rank's place.
    `timeout_s`: every collective's timeout (None: DeepSpeed's, 10 minutes or DEEPSPEED_TIMEOUT); `long_timeout_s`:
    wait_for_main's; `trace_dir`: where NCCL's flight recorder dumps on a timeout (GPU runs)."""
    global _long_group
    prepare_environment()
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(cuda_device_index(dict(os.environ), torch.cuda.device_count()))
        check_torch_kernels(current_gpu(), torch_arch_list(), torch.__version__)  # before any kernel or NCCL
        for key, value in nccl_environment(trace_dir).items():
            os.environ.setdefault(key, value)
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
    else:
        # DeepSpeed's CPU backend would compile its shared-memory all-reduce op (docs/performance.md) on first
        # use; it serves only DeepSpeed's inference all-reduce, training goes through gloo. DeepSpeed keeps the
        # probed op table in one dict so that such edits hold.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = {}
    if timeout_s is not None:
        timeout = {"timeout": timedelta(seconds=timeout_s)}
        # the groups DeepSpeed makes (its data-parallel group is a clone of the world's) are new_group()s without
        # a timeout, which torch fills in from these module defaults, not from the world group's: set them too
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout["timeout"]
    deepspeed.init_distributed(dist_backend=process_group_backend(cuda), **timeout)
    if _distributed():
        long_wait = timedelta(seconds=long_timeout_s) if long_timeout_s else None
        group = dist.new_group(backend="gloo", timeout=long_wait)
        if not isinstance(group, dist.ProcessGroup):  # a group of every rank has this one: never a non-member
            raise RuntimeError(f"rank {dist.get_rank()} is not in the long-wait group of all ranks: {group!r}")
        _long_group = group
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- collectives: the only place the project calls torch.distributed ---------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums `values` over every rank, in place, and returns it."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The largest of `values` over every rank, in place, and returns it."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_true(flag: bool | torch.Tensor) -> bool:
    """True when `flag` holds on every rank (a MIN all-reduce of one int).

    A tensor flag is reduced on its own
    device (NCCL for a CUDA tensor), so a value the GPU computed is not first copied to the host; the one host
    read is the answer."""
    if isinstance(flag, torch.Tensor):
        value = flag.detach().reshape(-1)[:1].to(torch.int32)
    else:
        value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    if _distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if _distributed():
        dist.barrier()


def wait_for_main(what: str, progress_s: float = 60.0) -> None:
    """Waits, on every rank but 0, for rank 0 to finish `what`, however long it takes.

    Rank 0 calls it when done with `what`; every other rank waits for that here, however long it takes up to
    train.long_wait_timeout_s, saying every `progress_s` seconds that it still waits. A barrier of the long-wait
    gloo group: a host-side wait, not a collective under the process group's short timeout."""
    if not _distributed():
        return

    done = threading.Event()
    t0 = time.monotonic()

    def progress():
        while not done.wait(progress_s):
            log.warning(
                "rank %d: still waiting for rank 0 to finish %s (%.0f s)", dist.get_rank(), what, time.monotonic() - t0
            )

    if dist.get_rank() != 0:
        threading.Thread(target=progress, name="wait-for-main", daemon=True).start()
    try:
        dist.barrier(group=_long_group)
    finally:
        done.set()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (anything picklable), on every rank."""
    if not _distributed():
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` (anything picklable), in rank order, on every rank."""
    if not _distributed():
        return [obj]

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Ends the process group, if one was started."""

    global _long_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _long_group = None
