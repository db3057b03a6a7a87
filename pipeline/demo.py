"""The main job on its embedded default: the whole pipeline on a tiny real-image dataset, CPU only.

Today's stages: the embedded digits written as ImageNet-22K-style per-synset tars -> `data_prep shard`
(shuffled train shards, a per-class val hold-out, DALI index files, manifest) -> `data_prep verify`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from data_prep.embedded import write_synset_tars
from data_prep.shard import ShardOptions, run_shard
from data_prep.verify import verify


def stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where the source, shards and results go")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    work = Path(args.workdir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    t0 = time.time()

    stage(1, 3, "embedded dataset: scikit-learn digits as ImageNet-22K-style per-synset tars")
    source = work / "source_22k_tars"
    if not source.exists():
        write_synset_tars(source)
    print(f"  {source}: {len(list(source.glob('*.tar')))} synset tars")

    stage(2, 3, "data_prep shard")
    shards = work / "shards"
    summary = run_shard(ShardOptions(source=str(source), out=str(shards), holdout_per_class=20,
                                     max_samples=256, workers=args.workers))
    print(json.dumps(summary, indent=1))

    stage(3, 3, "data_prep verify")
    report = verify(str(shards), workers=args.workers)
    for problem in report.problems:
        print("  " + problem)
    manifest = json.loads((shards / "manifest.json").read_text())

    print("\nsummary")
    splits = ", ".join(f"{k}: {v['samples']} images in {v['shards']} shards" for k, v in manifest["totals"].items())
    print(f"  shards:    {shards} ({splits})")
    print(f"  manifest:  {shards / 'manifest.json'}")
    print(f"  verified:  {'OK' if report.ok else f'FAILED ({len(report.problems)} problems)'}")
    print(f"  took {time.time() - t0:.1f}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
