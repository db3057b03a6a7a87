"""Throughput of `data_prep shard` against plain `tar` packing the same files, in one run.

Makes N real-photo JPEGs (random crops of scikit-image's photographs, ImageNet-like sizes) as an ImageFolder
tree, then alternates: tar | shard 1 worker x 1 thread | 1 worker x 2 threads | 2 workers x 2 threads | the same
with --resize-shorter, R rounds, and prints medians and ratios, with the CPU time the hypervisor stole (from
/proc/stat) and, as the ceiling on this machine, the validating decode alone on the files in memory. Each run starts
with the source evicted from the page cache (as a 1.3 TB source
is never cached) and ends with its output fsync'd (shards are fsync'd before their rename), so tar's rate is the
physical limit
of this disk for reading and writing the same bytes. The last line is `ratio_vs_tar: X.XX` (2 workers, no
resize).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from workdir import add_workdir_option, bench_workdir

from data_prep.images import prepare_image
from data_prep.shard import ShardOptions, run_shard

MAIN = "shard, 2 workers x 2 threads"  # the ratio_vs_tar line


def make_images(root: Path, count: int, classes: int, seed: int = 0) -> int:
    import skimage.data as sd

    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry(), sd.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        # ImageNet-like: a few hundred pixels a side at quality 85-95 (~40 KB; ImageNet averages ~110 KB)
        h = int(rng.integers(250, min(450, photo.shape[0]) + 1))
        w = int(rng.integers(250, min(500, photo.shape[1]) + 1))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        buf = io.BytesIO()
        Image.fromarray(photo[y : y + h, x : x + w]).save(buf, "JPEG", quality=int(rng.integers(85, 96)))
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"n{i % classes:08d}_{i}.JPEG").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def photo_shard_set(out: Path, images: int, per_shard: int) -> Path:
    """A shard set of `images` of these photos, `per_shard` a shard (made once: reused when `out` has one)."""
    if not (out / "manifest.json").exists():
        make_images(out.with_name(out.name + "-src"), images, classes=10)
        run_shard(
            ShardOptions(source=str(out.with_name(out.name + "-src")), out=str(out), max_samples=per_shard, workers=2)
        )
    return out


def evict(root: Path) -> None:
    """Drops the source files from the page cache, so every run reads them from disk as a real 1.3 TB source
    is read; the programs' own code stays cached, as it does in a long job."""
    os.sync()
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def time_tar(src: Path, dst: Path) -> float:
    """tar packing the same files, its output fsync'd like the shards are: read + write at disk speed."""
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(dst / "all.tar"), "-C", str(src), "."], check=True)
    with open(dst / "all.tar", "rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def time_shard(src: Path, dst: Path, workers: int, threads: int, resize: int | None, max_samples: int) -> float:
    t0 = time.perf_counter()
    summary = run_shard(
        ShardOptions(
            source=str(src),
            out=str(dst / "shards"),
            workers=workers,
            threads=threads,
            resize_shorter=resize,
            max_samples=max_samples,
        )
    )
    elapsed = time.perf_counter() - t0
    images = sum(1 for p in src.rglob("*") if p.is_file())
    if summary["images_rejected"] or summary["images_written"] != images or "manifest" not in summary:
        raise SystemExit(f"shard run incomplete: {summary}")  # a rate of a run that lost images means nothing
    return elapsed


def time_decode_only(src: Path, threads: int) -> float:
    """The validating decode alone, files already in memory: what the CPU allows before any I/O."""
    datas = [p.read_bytes() for p in sorted(src.rglob("*.JPEG"))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(prepare_image, datas, chunksize=16))
    return time.perf_counter() - t0


def cpu_jiffies() -> tuple[int, int]:
    """(all, stolen) CPU time of this machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="runs of each variant; medians are reported")
    p.add_argument("--resize-shorter", type=int, default=160)
    p.add_argument("--max-samples", type=int, default=250, help="samples per shard")
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "prep-bench-") as work:
        src = work / "src"
        if not src.exists():
            t0 = time.perf_counter()
            size = make_images(src, args.images, args.classes)
            print(f"made {args.images} JPEGs, {size / 1e6:.1f} MB, in {time.perf_counter() - t0:.1f}s")
        variants = {
            "tar": lambda d: time_tar(src, d),
            "shard, 1 worker x 1 thread": lambda d: time_shard(src, d, 1, 1, None, args.max_samples),
            "shard, 1 worker x 2 threads": lambda d: time_shard(src, d, 1, 2, None, args.max_samples),
            MAIN: lambda d: time_shard(src, d, 2, 2, None, args.max_samples),
            f"shard, 2 workers x 2 threads, --resize-shorter {args.resize_shorter}": lambda d: time_shard(
                src, d, 2, 2, args.resize_shorter, args.max_samples
            ),
            "validating decode alone, in memory, 2 threads": lambda d: time_decode_only(src, 2),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        stolen: dict[str, list[float]] = {name: [] for name in variants}
        for _round in range(args.rounds):
            for name, run in variants.items():  # interleaved, so drift hits every variant alike
                dst = work / "out"
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir()
                evict(src)
                all0, steal0 = cpu_jiffies()
                times[name].append(run(dst))
                all1, steal1 = cpu_jiffies()
                stolen[name].append((steal1 - steal0) / max(1, all1 - all0))
        shutil.rmtree(work / "out", ignore_errors=True)

        tar_rate = args.images / statistics.median(times["tar"])
        print(
            f"\n{args.images} images, {args.rounds} rounds, {os.cpu_count()} cores, "
            "inputs read from disk, outputs fsync'd; medians:"
        )
        print(f"{'variant':60s} {'img/s':>7s} {'vs tar':>7s} {'stolen':>7s}   all runs (s)")
        for name, ts in times.items():
            rate = args.images / statistics.median(ts)
            print(
                f"{name:60s} {rate:7.0f} {rate / tar_rate:7.2f} {statistics.median(stolen[name]):7.1%}   "
                f"{' '.join(f'{t:.3f}' for t in ts)}"
            )
        ratio = args.images / statistics.median(times[MAIN]) / tar_rate
        print(f"ratio_vs_tar: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
