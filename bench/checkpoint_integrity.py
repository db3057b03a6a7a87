"""What proving a checkpoint whole costs: a save with every file's checksum in its marker against the same save
without, and the resume-time check's seconds per GB against a plain read of the same files.

Builds the model (default Swin-B, 88M parameters, at 224 with 21,841 classes as in 22K pretraining) in a ZeRO
engine on one gloo rank (CPU), takes one optimizer step so the Adam moments exist, then (after one untimed save)
saves the way training does R times with checksums and R times without, alternating (each checkpoint deleted
before the next save), so that both see the same machine; then times R plain reads and R checks
(pipeline.engine.checkpoint.check_checkpoint) of one checkpoint, hot (just written, in the page cache) and cold
(its pages dropped with posix_fadvise(DONTNEED) after an fsync). The last line is `save_ratio_median: X`
(with / without).
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
from workdir import add_workdir_option, bench_workdir

READ = 8 << 20


def plain_read(folder: Path) -> int:
    """Reads every file of `folder` once, in READ chunks (what the check does minus the hashing); its bytes."""
    total, buffer = 0, bytearray(READ)
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def drop_cache(folder: Path) -> None:
    """The folder's files out of the page cache (written back first), so that the next read comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="swin_base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=21841)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    add_workdir_option(p)
    args = p.parse_args()
    from pipeline.config import load_config
    from pipeline.engine.checkpoint import check_checkpoint, save_checkpoint
    from pipeline.engine.distributed import init_distributed, shutdown
    from pipeline.engine.optim import plan_steps
    from pipeline.engine.step import micro_step
    from pipeline.engine.trainer import build_engine

    with bench_workdir(args.workdir, "integrity-bench-") as work:
        world = init_distributed()
        cfg = load_config(
            None,
            [
                f"model.arch={args.arch}",
                f"model.img_size={args.img_size}",
                "model.drop_path=0",
                "train.global_batch=1",
                "train.micro_batch=1",
                f"train.zero_stage={args.stage}",
                "train.precision=fp32",
                f"out_dir={work}",
                "name=bench",
                "checkpoint.keep_last=0",
            ],
        )
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        classes = [f"n{i:08d}" for i in range(args.classes)]
        engine, _ = build_engine(cfg, world, plan_steps(cfg, 1, 10**6), classes, "fp32")
        x, y = torch.randn(1, 3, args.img_size, args.img_size), torch.randint(0, args.classes, (1,))
        micro_step(engine, x, y, 0.1)
        loader = {"epoch": 0, "position": 1, "consumed": 1, "seed": 0, "world": 1, "rank": 0, "batch_size": 1}
        shutil.rmtree(save_checkpoint(engine, cfg, 0, 0, 1, loader, classes))  # warm-up: DeepSpeed's first save
        times: dict[bool, list[float]] = {True: [], False: []}
        for step in range(1, 2 * args.rounds + 1):
            checksums = step % 2 == 1
            t0 = time.perf_counter()
            path = save_checkpoint(engine, cfg, step, 0, 1, loader, classes, checksums=checksums)
            times[checksums].append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir())
            if step < 2 * args.rounds:
                shutil.rmtree(path)
        shutil.rmtree(path)  # the last save's had no checksums: one with them to check
        path = save_checkpoint(engine, cfg, 2 * args.rounds + 1, 0, 1, loader, classes)
        reads: dict[str, list[float]] = {"read_hot": [], "check_hot": [], "read_cold": [], "check_cold": []}
        for _ in range(args.rounds):
            for kind in ("read", "check"):
                for temperature in ("hot", "cold"):
                    if temperature == "cold":
                        drop_cache(path)
                    else:
                        plain_read(path)  # in the page cache
                    t0 = time.perf_counter()
                    if kind == "read":
                        plain_read(path)
                    else:
                        damage, verified = check_checkpoint(path)
                        assert damage is None and verified
                    reads[f"{kind}_{temperature}"].append(time.perf_counter() - t0)
        shutdown()
        gb = size / 1e9
        with_, without = statistics.median(times[True]), statistics.median(times[False])
        print(
            f"{args.arch} at {args.img_size}, {args.classes} classes, ZeRO-{args.stage}, 1 rank, "
            f"{torch.get_num_threads()} hashing threads, {os.cpu_count()} cores; checkpoint {size / 1e9:.2f} GB; "
            f"{args.rounds} rounds"
        )
        print(f"save_s_with_checksums: {' '.join(f'{t:.2f}' for t in times[True])} (median {with_:.2f})")
        print(f"save_s_without: {' '.join(f'{t:.2f}' for t in times[False])} (median {without:.2f})")
        for key, values in reads.items():
            median = statistics.median(values)
            print(f"{key}_s_per_gb: {median / gb:.3f} ({' '.join(f'{t:.2f}' for t in values)} s)")
        for temperature in ("hot", "cold"):
            ratio = statistics.median(reads[f"check_{temperature}"]) / statistics.median(reads[f"read_{temperature}"])
            print(f"check_vs_read_{temperature}: {ratio:.2f}x")
        print(f"save_ratio_median: {with_ / without:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
