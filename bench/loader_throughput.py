"""Images/s and CPU-ms per image of the loader's DALI backend against its PyTorch backend, on the same shards
with the same augmentations (random-resized-crop to 224, flip, normalise; optionally RandAugment m9: timm's in the
torch backend, DALI's
auto_aug.rand_augment in the DALI backend).

Shards are made from N real-photo JPEGs (bench/prep_throughput.py's images) and read warm (this measures
decoding and augmenting, not the disk). Variants alternate for R rounds in this one process tree; CPU time is
user+sys of this process and its (DataLoader worker) children, from each epoch's first batch on. The last line is
`ratio_dali_vs_torch: X.XX`
(CPU, without RandAugment).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

from prep_throughput import photo_shard_set
from workdir import add_workdir_option, bench_workdir

from pipeline.data.loader import LoaderConfig, create_loader

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_epoch(cfg: LoaderConfig) -> tuple[float, float, int]:
    """One epoch, timed from its first batch on: the steady state, without pipeline build or worker start-up
    (paid once per epoch, which on ImageNet lasts an hour)."""
    loader = create_loader(cfg)
    batches = iter(loader)
    next(batches)
    t0, c0, images = time.perf_counter(), cpu_seconds(), 0
    for x, _y in batches:
        images += len(x)
    if cfg.device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0, cpu_seconds() - c0, images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DALI threads and DataLoader workers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "loader-bench-") as work:
        shards = photo_shard_set(work / "shards", args.images, 500)
        for tar in shards.rglob("*.tar"):
            tar.read_bytes()  # warm: the disk is not what this measures

        def cfg(backend: str, rand_augment: str | None) -> LoaderConfig:
            return LoaderConfig(
                shards=str(shards),
                batch_size=args.batch_size,
                image_size=224,
                backend=backend,
                device=args.device,
                workers=args.workers,
                rand_augment=rand_augment,
            )

        variants = {
            "torch": cfg("torch", None),
            "dali": cfg("dali", None),
            "torch + RandAugment": cfg("torch", RAND_AUGMENT),
            "dali + RandAugment": cfg("dali", RAND_AUGMENT),
        }
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, c in variants.items():
                results[name].append(run_epoch(c))

        counts = {n for runs in results.values() for _w, _c, n in runs}
        if len(counts) != 1:  # every variant must have decoded the same images, or the rates compare nothing
            raise SystemExit(f"variants delivered different image counts per epoch: {sorted(counts)}")
        print(
            f"\n{args.images} images, batch {args.batch_size}, 224x224, {args.workers} workers, "
            f"{os.cpu_count()} cores, device {args.device}, {args.rounds} rounds; medians:"
        )
        print(f"{'variant':24s} {'img/s':>8s} {'CPU-ms/img':>11s}   img/s of each run")
        rate = {}
        for name, runs in results.items():
            rates = [n / wall for wall, _cpu, n in runs]
            cpu_ms = statistics.median(1000 * cpu / n for _wall, cpu, n in runs)
            rate[name] = statistics.median(rates)
            print(f"{name:24s} {rate[name]:8.0f} {cpu_ms:11.2f}   {' '.join(f'{r:.0f}' for r in rates)}")
        print(
            f"ratio with RandAugment, dali vs torch: {rate['dali + RandAugment'] / rate['torch + RandAugment']:.2f}"
            f" (DALI's RandAugment policy, not timm's: docs/loading.md)"
        )
        print(f"images timed per epoch, every variant: {counts.pop()}")
        print(f"ratio_dali_vs_torch: {rate['dali'] / rate['torch']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
