"""Process-group setup for the three ways a rank is started:

- the `deepspeed` launcher (and torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set;
- Slurm's `srun`, one task per GPU: DeepSpeed never reads SLURM_*, so they are mapped here (the master is the
  first host of the job's node list, the port derived from the job id unless MASTER_PORT is set);
- a plain `python -m pipeline.train`: a world of one.

Importing DeepSpeed picks its accelerator once, so DS_ACCELERATOR is set to `cpu` first where there is no GPU.

Every collective the project runs goes through the helpers at the end of this module (all_reduce_sum,
all_true, barrier, broadcast_object, shutdown), so the rules of the process group's backends live in one place;
each is a no-op in a world of one or without a process group.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch


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
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost"))
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]  # "node[01-04]" without scontrol: best effort


def prepare_environment() -> None:
    os.environ.update(environment_from_slurm(dict(os.environ)))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"


def init_distributed() -> World:
    """Starts the process group (NCCL on GPUs, gloo on CPU) through DeepSpeed and returns this rank's place."""
    prepare_environment()
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # DeepSpeed's CPU backend would compile its shared-memory all-reduce op (35-100 s per machine) on first
        # use; it serves only DeepSpeed's inference all-reduce, training goes through gloo. DeepSpeed keeps the
        # probed op table in one dict so that such edits hold.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- collectives: the only place the project calls torch.distributed ---------------------------------------
def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums `values` over every rank, in place, and returns it."""
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (a MIN all-reduce of one int)."""
    if not _distributed():
        return bool(flag)
    import torch.distributed as dist

    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (anything picklable), on every rank."""
    if not _distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Ends the process group, if one was started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
