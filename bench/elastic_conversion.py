"""What an elastic resume costs: converting a ZeRO checkpoint for another world size (DeepSpeed's ds_to_universal,
run by pipeline.engine.checkpoint.universal_copy) and the extra disk the converted copy takes.

Builds the model (default Swin-B, 88M parameters, at 224 with 21,841 classes as in 22K pretraining) in a ZeRO
engine on W gloo ranks (CPU), takes one optimizer step so the Adam moments exist, saves a checkpoint the way
training does, then converts it R times (a fresh copy each time) and reports the median seconds, the checkpoint's
bytes and the universal copy's bytes. The last line is `conversion_seconds_median: X`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp
from workdir import add_workdir_option, bench_workdir


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_rank(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.engine.checkpoint import save_checkpoint
    from pipeline.engine.distributed import init_distributed, shutdown
    from pipeline.engine.optim import plan_steps
    from pipeline.engine.step import micro_step
    from pipeline.engine.trainer import build_engine

    world_info = init_distributed()
    cfg = load_config(
        None,
        [
            f"model.arch={args.arch}",
            f"model.img_size={args.img_size}",
            "model.drop_path=0",
            f"train.global_batch={world}",
            "train.micro_batch=1",
            f"train.zero_stage={args.stage}",
            "train.precision=fp32",
            f"out_dir={out}",
            "name=bench",
            "checkpoint.keep_last=0",
        ],
    )
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_steps(cfg, world, 10**6)
    classes = [f"n{i:08d}" for i in range(args.classes)]
    engine, _ = build_engine(cfg, world_info, plan, classes, "fp32")
    x, y = torch.randn(1, 3, args.img_size, args.img_size), torch.randint(0, args.classes, (1,))
    micro_step(engine, x, y, 0.1)
    save_checkpoint(
        engine,
        cfg,
        1,
        rank,
        world,
        {"epoch": 0, "position": 1, "consumed": world, "seed": 0, "world": world, "rank": rank, "batch_size": 1},
        classes,
    )
    shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="swin_base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=21841)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    add_workdir_option(p)
    args = p.parse_args()
    from pipeline.engine.checkpoint import universal_copy
    from pipeline.engine.distributed import free_port

    with bench_workdir(args.workdir, "elastic-bench-") as work:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=save_rank, args=(r, args.world, port, args, str(work))) for r in range(args.world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"a saving rank exited {proc.exitcode}")
        checkpoint = work / "bench" / "checkpoints" / "step_00000001"
        params = sum(
            v.numel()
            for v in torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
                "module"
            ].values()
        )
        times = []
        for _ in range(args.rounds):
            shutil.rmtree(checkpoint.with_name(checkpoint.name + ".universal"), ignore_errors=True)
            t0 = time.perf_counter()
            universal = universal_copy(checkpoint, rank=0)
            times.append(time.perf_counter() - t0)
        print(
            f"{args.arch} {params / 1e6:.1f}M parameters, ZeRO-{args.stage} at world {args.world}, "
            f"{os.cpu_count()} cores, {args.rounds} conversions"
        )
        print(f"checkpoint_bytes: {du(checkpoint)}")
        print(f"universal_copy_bytes: {du(universal)} ({du(universal) / du(checkpoint):.2f}x the checkpoint)")
        print(f"conversion_seconds: {' '.join(f'{t:.1f}' for t in times)}")
        print(f"conversion_seconds_median: {statistics.median(times):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
