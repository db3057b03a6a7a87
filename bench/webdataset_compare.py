"""Why the project keeps its own shard reader and writer beside the `webdataset` package (which reads every set
it writes: tests/test_webdataset_compat.py), measured on the same shards:

- reading an epoch in order (raw bytes, no decode): webdataset's tar iterator against the project's reader
  (one pread per member, at the offsets of the split index);
- an exact resume in the middle of an epoch: the next 64 samples of every shard from its middle. The project's
  reader goes straight to them; a tar stream has to be read from the start of each shard up to them;
- a byte-reproducible writer: the same samples written twice, a second apart, with webdataset's TarWriter as it
  comes (sha256 of the two files) -- the project's writer is byte-deterministic (tests/test_shard.py reruns).

Shards come from real-photo JPEGs (bench/prep_throughput.py's images). Medians of R rounds; the last line is
`ratio_resume_ours_vs_webdataset: X.X` (how many times faster the project's reader resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

import webdataset  # noqa: E402
from prep_throughput import photo_shard_set  # noqa: E402
from workdir import add_workdir_option, bench_workdir  # noqa: E402

from data_prep.shardset.reader import open_shard_set  # noqa: E402
from pipeline.data.cache import ShardCache  # noqa: E402
from pipeline.data.reader import ShardReader  # noqa: E402

warnings.filterwarnings("ignore", module="webdataset")  # it asks for an explicit shardshuffle


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--shard-images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "webdataset-bench-") as work:
        local = photo_shard_set(work / "set", args.images, args.shard_images)
        shard_set = open_shard_set(str(local), "train")
        reader = ShardReader(shard_set, ShardCache(work / "cache", 1 << 30))
        urls = [str(local / s.name) for s in shard_set.shards]
        for url in urls:
            Path(url).read_bytes()  # warm: both read from the page cache

        def ours_epoch() -> int:
            n = 0
            for shard, s in enumerate(shard_set.shards):
                for sample in range(s.samples):
                    jpg, _label = reader.read(shard, sample)
                    n += 1
            return n

        def wds_epoch() -> int:
            return sum(1 for _ in webdataset.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls"))

        def ours_resume() -> int:
            n = 0
            for shard, s in enumerate(shard_set.shards):
                for sample in range(s.samples // 2, min(s.samples, s.samples // 2 + 64)):
                    reader.read(shard, sample)
                    n += 1
            return n

        def wds_resume() -> int:
            n = 0
            for url, s in zip(urls, shard_set.shards, strict=True):
                ds = webdataset.WebDataset([url], shardshuffle=False).to_tuple("jpg", "cls")
                n += sum(1 for _ in ds.slice(s.samples // 2, min(s.samples, s.samples // 2 + 64)))
            return n

        variants = {
            "epoch in order, webdataset": wds_epoch,
            "epoch in order, project reader": ours_epoch,
            "resume mid-shard, webdataset": wds_resume,
            "resume mid-shard, project reader": ours_resume,
        }
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results[name].append(timed(fn))
        median = {}
        print(f"{len(urls)} shards, {shard_set.num_samples} samples; samples/s (median of {args.rounds}; runs in s)")
        for name, runs in results.items():
            counts = {n for _t, n in runs}
            median[name] = counts.pop() / statistics.median(t for t, _n in runs)
            print(f"{name:36s} {median[name]:9.0f}  " + " ".join(f"{t:.3f}" for t, _n in runs))
        if {n for _t, n in results["resume mid-shard, webdataset"]} != {
            n for _t, n in results["resume mid-shard, project reader"]
        }:
            raise SystemExit("the two readers resumed to different numbers of samples")

        first = local / shard_set.shards[0].name
        digests = []
        for attempt in range(2):  # webdataset's TarWriter as it comes, the same samples twice
            path = work / f"wds-{attempt}.tar"
            with webdataset.TarWriter(str(path)) as sink:
                for j in range(min(50, shard_set.shards[0].samples)):
                    jpg, cls = reader.read(0, j)
                    sink.write(
                        {
                            "__key__": shard_set.table.key(shard_set.table.row(0, j)),
                            "jpg": jpg,
                            "cls": cls,
                            "json": json.dumps({"sample": j}),
                        }
                    )
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest()[:12])
            time.sleep(1.1)
        print(
            f"webdataset.TarWriter, the same samples twice: sha256 {digests[0]} / {digests[1]} "
            f"({'identical' if digests[0] == digests[1] else 'different: mtime is the time of writing'}); "
            f"{first.name} is byte-reproducible by the project's writer"
        )
        print(
            f"ratio_epoch_ours_vs_webdataset: "
            f"{median['epoch in order, project reader'] / median['epoch in order, webdataset']:.1f}"
        )
        print(
            f"ratio_resume_ours_vs_webdataset: "
            f"{median['resume mid-shard, project reader'] / median['resume mid-shard, webdataset']:.1f}"
        )
        reader.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
