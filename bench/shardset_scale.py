"""Opening a shard set of ImageNet-22K's shard count (14,200 by default) as one training rank does: the time of
`open_shard_set` (the manifest, one listing, the split index) and the memory the opened set holds per sample.

The set is written by the project's own `data_prep shard` from tiny JPEGs (S images per shard, so that 14,200
shards fit a laptop's disk and a few minutes), read from the local disk and from the real S3 server behind
DELAY ms of latency per request (scripts/latency_proxy.py), with the split index and with a damaged one (a
manifest whose sha256 for it does not match: every shard's .idx is read instead, 14,200 GETs per rank). Each open
runs in a fresh process; medians over the rounds. Memory is what tracemalloc counts as freed when the opened ShardSet
is dropped (its sample table and
its per-shard records); at ImageNet's 1,000 images per shard the per-shard part weighs 1/1000 as much per
sample, and that figure is given too (the table's bytes per sample measured, plus the per-shard bytes measured
divided by 1,000). The last line is `open_s3_seconds: X.XX` (with the split index).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from remote_s3 import remote_s3, upload_set  # noqa: E402
from workdir import add_workdir_option, bench_workdir  # noqa: E402

OPEN = """
import gc, json, sys, time, tracemalloc
from data_prep.shardset.reader import open_shard_set
t0 = time.perf_counter()
s = open_shard_set(sys.argv[1], "train")  # timed without tracemalloc, which slows boto3's parsing severalfold
seconds = time.perf_counter() - t0
del s
tracemalloc.start()
s = open_shard_set(sys.argv[1], "train")  # again, for the memory it holds
gc.collect()  # the open's own garbage (boto3's reference cycles) first
with_set = tracemalloc.get_traced_memory()[0]
out = {"seconds": seconds, "samples": s.num_samples, "shards": len(s.shards), "table": s.table.nbytes()}
del s
gc.collect()
out["held"] = with_set - tracemalloc.get_traced_memory()[0]  # what the set holds, not the S3 client's caches
print(json.dumps(out))
"""


def make_source(root: Path, images: int, classes: int = 100) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"n{i % classes:08d}_{i}.JPEG").write_bytes(buf.getvalue())


def open_once(url: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", OPEN, url], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise SystemExit(f"opening {url} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=14200)
    p.add_argument("--shard-images", type=int, default=10, help="images per shard")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=50.0, help="latency added to every S3 request")
    p.add_argument("--no-s3", action="store_true", help="local disk only")
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "shardset-scale-bench-") as work:
        local, damaged = work / "set", work / "damaged"
        if not (local / "manifest.json").exists():
            make_source(work / "src", args.shards * args.shard_images)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_prep",
                    "shard",
                    "--source",
                    str(work / "src"),
                    "--out",
                    str(local),
                    "--max-samples",
                    str(args.shard_images),
                    "--workers",
                    "2",
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            shutil.rmtree(work / "src")
        damaged_manifest = as_damaged_set(local, damaged)
        with nullcontext((None, None)) if args.no_s3 else remote_s3(work, args.delay_ms) as (client, env):
            if client is not None:
                upload_set(client, local, "bench")
            results = measure(args, local, damaged, damaged_manifest, client, env)
        report(args, results)
        return 0


def as_damaged_set(local: Path, damaged: Path) -> bytes:
    """The same shards (hard links, not copies) under a manifest whose split index sha256 does not match, so that
    every shard's .idx is read instead; returns that manifest."""
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["split_indexes"]["train"]["sha256"] = "0" * 64
    damaged_manifest = json.dumps(manifest).encode()
    if not damaged.exists():
        (damaged / "train").mkdir(parents=True)
        for f in (local / "train").iterdir():
            os.link(f, damaged / "train" / f.name)
        for f in local.iterdir():
            if f.is_file():
                shutil.copy(f, damaged / f.name)
        (damaged / "manifest.json").write_bytes(damaged_manifest)
    return damaged_manifest


def measure(args, local: Path, damaged: Path, damaged_manifest: bytes, client, env) -> dict[str, list[dict]]:
    s3_split = f"s3 +{args.delay_ms:g} ms, split index"
    s3_every = f"s3 +{args.delay_ms:g} ms, every .idx (damaged index)"
    results: dict[str, list[dict]] = {"local, split index": [], "local, every .idx (damaged index)": []}
    if client is not None:
        results.update({s3_split: [], s3_every: []})
    for _ in range(args.rounds):
        results["local, split index"].append(open_once(str(local), dict(os.environ)))
        results["local, every .idx (damaged index)"].append(open_once(str(damaged), dict(os.environ)))
        if client is not None:  # the same bucket, with the good manifest, then with the damaged one, then back
            results[s3_split].append(open_once("s3://bench/set", env))
            client.put_object(Bucket="bench", Key="set/manifest.json", Body=damaged_manifest)
            results[s3_every].append(open_once("s3://bench/set", env))
            client.put_object(Bucket="bench", Key="set/manifest.json", Body=(local / "manifest.json").read_bytes())
    return results


def report(args, results: dict[str, list[dict]]) -> None:
    first = results["local, split index"][0]
    samples, shards = first["samples"], first["shards"]
    print(
        f"{shards} train shards of {args.shard_images} images, {samples} samples; open_shard_set per rank, "
        f"a fresh process each (median of {args.rounds}; runs in s)"
    )
    print(f"{'variant':40s} {'open s':>7s} {'held B/sample':>14s}")
    for name, runs in results.items():
        if {(r["samples"], r["shards"]) for r in runs} != {(samples, shards)}:
            raise SystemExit(f"{name} opened another set: {runs}")
        held = statistics.median(r["held"] for r in runs)
        print(
            f"{name:40s} {statistics.median(r['seconds'] for r in runs):7.2f} {held / samples:14.1f}  "
            + " ".join(f"{r['seconds']:.2f}" for r in runs)
        )
    table = first["table"] / samples
    per_shard = (statistics.median(r["held"] for r in results["local, split index"]) - first["table"]) / shards
    print(f"sample table: {table:.1f} B/sample; everything else the open set holds: {per_shard:.0f} B/shard")
    print(f"held_bytes_per_sample_at_1000_per_shard: {table + per_shard / 1000:.1f}")
    if not args.no_s3:
        median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in results.items()}
        split, every = (
            median[f"s3 +{args.delay_ms:g} ms, {what}"] for what in ("split index", "every .idx (damaged index)")
        )
        print(f"ratio_every_idx_vs_split_index_s3: {every / split:.1f}")
        print(f"open_s3_seconds: {split:.2f}")


if __name__ == "__main__":
    sys.exit(main())
