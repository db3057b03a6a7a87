"""Loader images/s from the real S3 server behind 50 ms of latency per request, with a cold shard cache, against
the same loader reading a warm local copy of the set (the target: at least 0.9 of it). A third variant turns
read-ahead off, to show what it buys.

The S3 server is `weed mini` (scripts/start_s3_server.sh), behind scripts/latency_proxy.py, which holds every
request DELAY ms before passing it on. It stands in for a remote store, so it and the proxy get the last core to
themselves and the loader (every variant) the others: what is measured is the loader waiting for S3, not the
server's CPU taking the loader's (boto3's own work stays on the loader's cores, as on a training node). Shards are made
from real-photo JPEGs (bench/prep_throughput.py's images).
Every round runs each variant once, alternating; a cold round starts with an empty cache folder. An epoch is timed
whole, from `iter(loader)` to its last batch, after the shard set is opened (one GET of the split index), and
also from its first batch on (the steady state: a cold cache waits at the first batch, once an epoch, which on
ImageNet lasts an hour). Medians over the rounds; the last line is `ratio_s3_cold_vs_local_warm: X.XX` (whole
epochs, with read-ahead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from prep_throughput import photo_shard_set  # noqa: E402
from remote_s3 import remote_s3, upload_set  # noqa: E402
from workdir import add_workdir_option, bench_workdir  # noqa: E402

from pipeline.data.loader import LoaderConfig, create_loader  # noqa: E402


def timed_epoch(cfg: LoaderConfig) -> tuple[float, float, int, int]:
    """(whole epoch s, its first batch's wait s, images, images of the batches after the first)."""
    loader = create_loader(cfg)
    t0, images = time.perf_counter(), 0
    for x, _y in loader:
        if not images:
            first, first_n = time.perf_counter() - t0, len(x)
        images += len(x)
    return time.perf_counter() - t0, first, images, images - first_n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--shard-images", type=int, default=100, help="images per shard")
    p.add_argument(
        "--shuffle-window",
        type=int,
        default=400,
        help="samples (the default keeps ImageNet's 8192 samples / 1000-image shards ratio roughly)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--backend", choices=["torch", "dali"], default="torch")
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="DataLoader workers (default: one per core the loader has)",
    )
    p.add_argument("--read-ahead", type=int, default=4)
    p.add_argument("--delay-ms", type=float, default=50.0, help="latency added to every S3 request")
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "s3-read-ahead-bench-") as work:
        local = photo_shard_set(work / "set", args.images, args.shard_images)
        cores = sorted(os.sched_getaffinity(0))
        server_cores = {cores[-1]} if len(cores) > 1 else None
        with remote_s3(work, args.delay_ms, server_cores) as (client, env):
            upload_set(client, local, "bench")
            os.environ.update(env)
            if server_cores:  # the loader (and its workers, which inherit it) on the other cores
                os.sched_setaffinity(0, set(cores) - server_cores)
            return measure(args, local, work / "cache")


def measure(args, local: Path, cache: Path) -> int:
    for tar in local.rglob("*.tar"):
        tar.read_bytes()  # warm: the local baseline reads from the page cache

    def cfg(shards: str, read_ahead: int) -> LoaderConfig:
        return LoaderConfig(
            shards=shards,
            batch_size=args.batch_size,
            image_size=args.image_size,
            backend=args.backend,
            workers=args.workers,
            shuffle_window=args.shuffle_window,
            cache_dir=str(cache),
            read_ahead=read_ahead,
        )

    variants = {
        "local, warm": cfg(str(local), 0),
        f"s3 +{args.delay_ms:g} ms, cold, read-ahead {args.read_ahead}": cfg("s3://bench/set", args.read_ahead),
        f"s3 +{args.delay_ms:g} ms, cold, no read-ahead": cfg("s3://bench/set", 0),
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, c in variants.items():
            shutil.rmtree(cache, ignore_errors=True)
            results[name].append(timed_epoch(c))
    counts = {(r[2], r[3]) for runs in results.values() for r in runs}
    if len(counts) != 1:
        raise SystemExit(f"variants read different numbers of images: {counts}")
    n, after_first = counts.pop()
    print(
        f"{args.backend} backend, {args.workers} workers, batch {args.batch_size}, {args.image_size} px; "
        f"{args.images} images in shards of {args.shard_images}; images per epoch, every variant: {n}"
    )
    print(
        f"{'variant':44s} {'epoch img/s':>11s} {'after 1st batch':>15s} {'1st batch s':>11s}  "
        f"(median of {args.rounds}; epochs in s)"
    )
    whole, steady = {}, {}
    for name, runs in results.items():
        whole[name] = n / statistics.median(r[0] for r in runs)
        steady[name] = after_first / statistics.median(r[0] - r[1] for r in runs)
        print(
            f"{name:44s} {whole[name]:11.0f} {steady[name]:15.0f} {statistics.median(r[1] for r in runs):11.2f}"
            "  " + " ".join(f"{r[0]:.2f}" for r in runs)
        )
    local, ahead, without = list(variants)
    print(f"ratio_steady_no_read_ahead_vs_local_warm: {steady[without] / steady[local]:.2f}")
    print(f"ratio_steady_s3_cold_vs_local_warm: {steady[ahead] / steady[local]:.2f}")
    print(f"ratio_no_read_ahead_vs_local_warm: {whole[without] / whole[local]:.2f}")
    print(f"ratio_s3_cold_vs_local_warm: {whole[ahead] / whole[local]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
