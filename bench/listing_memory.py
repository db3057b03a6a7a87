"""Memory per listed image of `data_prep shard --list-only` (listing + plan, what every Slurm array task holds),
as the slope of peak RSS between two sizes of an ImageNet-22K-shaped source: 21,841 per-synset tars with A and
then B images each (tiny members: listing reads headers only). Also the listing time at the larger size.

With `--baseline-rev REV` the same measurement runs, in the same invocation, on the project as of git revision
REV (a temporary worktree of this repository, same virtualenv), for a ratio against it. Each (code, size) runs
R times in fresh processes; medians. The last line is `bytes_per_image: X` (this checkout).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from pathlib import Path

from workdir import add_workdir_option, bench_workdir

REPO = Path(__file__).resolve().parents[1]

PEAK = """
import resource, runpy, sys
sys.argv = ["data_prep"] + sys.argv[1:]
try:
    runpy.run_module("data_prep", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def make_tars(root: Path, synsets: int, per_tar: int) -> int:
    root.mkdir(parents=True)
    payload = b"\xff\xd8\xff" + b"\0" * 97
    for s in range(synsets):
        synset = f"n{s:08d}"
        with tarfile.open(root / f"{synset}.tar", "w") as tf:
            for i in range(per_tar):
                info = tarfile.TarInfo(f"{synset}_{i * 7919 % 100000}.JPEG")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return synsets * per_tar


def list_only(code: Path, source: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK,
            "shard",
            "--source",
            str(source),
            "--out",
            str(out),
            "--list-only",
            "--workers",
            "2",
        ],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"--list-only failed in {code}:\n{proc.stderr[-3000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")]
    return seconds, int(peak[-1].split()[1]) * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synsets", type=int, default=21841)
    p.add_argument("--small", type=int, default=2, help="images per tar, first size")
    p.add_argument("--large", type=int, default=10, help="images per tar, second size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-rev", help="git revision to measure too (e.g. a commit before a change)")
    add_workdir_option(p)
    args = p.parse_args()

    with bench_workdir(args.workdir, "listing-memory-bench-") as work, ExitStack() as cleanup:
        sizes = {}
        for per_tar in (args.small, args.large):
            src = work / f"tars-{per_tar}"
            sizes[per_tar] = args.synsets * per_tar
            if not src.exists():
                make_tars(src, args.synsets, per_tar)
        codes = {"this checkout": REPO}
        if args.baseline_rev:
            worktree = work / "baseline"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.baseline_rev],
                check=True,
                capture_output=True,
            )
            cleanup.callback(
                subprocess.run,
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                capture_output=True,
            )
            codes[f"at {args.baseline_rev}"] = worktree
        results = {(name, n): [] for name in codes for n in sizes}
        for _ in range(args.rounds):
            for name, code in codes.items():
                for per_tar in sizes:
                    results[(name, per_tar)].append(list_only(code, work / f"tars-{per_tar}", work / "out"))
        print(f"data_prep shard --list-only over {args.synsets} synset tars (median of {args.rounds})")
        print(f"{'code':28s} {'images':>9s} {'peak RSS MB':>12s} {'seconds':>8s}")
        slope = {}
        for name in codes:
            peaks = {}
            for per_tar, n in sizes.items():
                runs = results[(name, per_tar)]
                peaks[per_tar] = statistics.median(r[1] for r in runs)
                print(f"{name:28s} {n:9d} {peaks[per_tar] / 1e6:12.1f} {statistics.median(r[0] for r in runs):8.2f}")
            slope[name] = (peaks[args.large] - peaks[args.small]) / (sizes[args.large] - sizes[args.small])
            print(f"{name:28s} slope: {slope[name]:.0f} bytes per listed image")
        if args.baseline_rev:
            base = f"at {args.baseline_rev}"
            t_new = statistics.median(r[0] for r in results[("this checkout", args.large)])
            t_old = statistics.median(r[0] for r in results[(base, args.large)])
            print(f"ratio_time_vs_baseline: {t_new / t_old:.2f}")
            print(f"ratio_bytes_per_image_vs_baseline: {slope['this checkout'] / slope[base]:.2f}")
        print(f"bytes_per_image: {slope['this checkout']:.0f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
