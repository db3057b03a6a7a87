"""Loader images/s from the real S3 server behind 50 ms of latency per request, with a cold shard cache, against
the same loader reading a warm local copy of the set (the target: at least 0.9 of it). A third variant turns
read-ahead off, to show what it buys.

The S3 server is `weed mini` (scripts/start_s3_server.sh), behind scripts/latency_proxy.py, which holds every
request DELAY ms before passing it on. Shards are made from real-photo JPEGs (bench/prep_throughput.py's images).
Every round runs each variant once, alternating; a cold round starts with an empty cache folder. An epoch is timed
whole, from `iter(loader)` to its last batch (its first batch included: that is where a cold cache waits), after
the shard set is opened (one GET of the split index). Medians over the rounds; the last line is
`ratio_s3_cold_vs_local_warm: X.XX` (with read-ahead).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from prep_throughput import photo_shard_set  # noqa: E402
from remote_s3 import remote_s3, upload_set  # noqa: E402

from pipeline.data.loader import LoaderConfig, create_loader  # noqa: E402


def timed_epoch(cfg: LoaderConfig) -> tuple[float, int]:
    loader = create_loader(cfg)
    t0, images = time.perf_counter(), 0
    for x, _y in loader:
        images += len(x)
    return time.perf_counter() - t0, images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--shard-images", type=int, default=100, help="images per shard")
    p.add_argument("--shuffle-window", type=int, default=400,
                   help="samples (the default keeps ImageNet's 8192 samples / 1000-image shards ratio roughly)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--backend", choices=["torch", "dali"], default="torch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--read-ahead", type=int, default=4)
    p.add_argument("--delay-ms", type=float, default=50.0, help="latency added to every S3 request")
    p.add_argument("--workdir", help="default: a folder in the system temp dir, deleted afterwards")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="s3-read-ahead-bench-"))
    try:
        local = photo_shard_set(work / "set", args.images, args.shard_images)
        with remote_s3(work, args.delay_ms) as (client, env):
            upload_set(client, local, "bench")
            os.environ.update(env)
            return measure(args, local, work / "cache")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, local: Path, cache: Path) -> int:
    for tar in local.rglob("*.tar"):
        tar.read_bytes()  # warm: the local baseline reads from the page cache

    def cfg(shards: str, read_ahead: int) -> LoaderConfig:
        return LoaderConfig(shards=shards, batch_size=args.batch_size, image_size=args.image_size,
                            backend=args.backend, workers=args.workers, shuffle_window=args.shuffle_window,
                            cache_dir=str(cache), read_ahead=read_ahead)

    variants = {"local, warm": cfg(str(local), 0),
                f"s3 +{args.delay_ms:g} ms, cold, read-ahead {args.read_ahead}": cfg("s3://bench/set",
                                                                                      args.read_ahead),
                f"s3 +{args.delay_ms:g} ms, cold, no read-ahead": cfg("s3://bench/set", 0)}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, c in variants.items():
            shutil.rmtree(cache, ignore_errors=True)
            results[name].append(timed_epoch(c))
    counts = {n for runs in results.values() for _t, n in runs}
    if len(counts) != 1:
        raise SystemExit(f"variants read different numbers of images: {counts}")
    n = counts.pop()
    print(f"{args.backend} backend, {args.workers} workers, batch {args.batch_size}, {args.image_size} px; "
          f"{args.images} images in shards of {args.shard_images}; images per epoch, every variant: {n}")
    print(f"{'variant':48s} {'img/s':>7s}  (median of {args.rounds}; epochs in s)")
    median = {}
    for name, runs in results.items():
        median[name] = n / statistics.median(t for t, _n in runs)
        print(f"{name:48s} {median[name]:7.0f}  " + " ".join(f"{t:.2f}" for t, _n in runs))
    names = list(variants)
    print(f"ratio_no_read_ahead_vs_local_warm: {median[names[2]] / median[names[0]]:.2f}")
    print(f"ratio_s3_cold_vs_local_warm: {median[names[1]] / median[names[0]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
