"""The loss curve of a tiny-recipe run that goes 2 -> 1 -> 2 ranks (stopped, resumed elastically through
launch/pretrain_22k.sh as a user types it, NUM_GPUS=2 then 1 then 2), next to the same run uninterrupted on 2
ranks. Writes a PNG (--png) and prints, per segment, the largest relative loss difference between the two runs.

The recipe is configs/tiny_22k.yaml on the embedded digits (CPU, gloo), with the test suite's smaller batch
(global 32 = 16 per rank on 2 ranks, 32 with accumulation 2 on 1), ZeRO-2 and drop path as configured: after an
elastic resume the per-rank drop-path streams are derived anew, so the curves part a little by design.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from workdir import add_workdir_option, bench_workdir

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "pretrain_22k.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, shards: Path, out: Path, name: str, steps: int, every: int, extra: list[str]) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE") and not k.startswith("SLURM_")
    }
    env.update(PYTHON=sys.executable, MASTER_PORT=str(free_port()), NUM_GPUS=str(ranks))
    args = [
        "--config",
        str(REPO / "configs/tiny_22k.yaml"),
        f"name={name}",
        f"out_dir={out}",
        f"data.shards={shards}",
        "train.global_batch=32",
        "train.micro_batch=16",
        "data.workers=1",
        "train.log_every=1",
        "tracking.enabled=false",
        "data.val_split=",
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={every}",
        *extra,
    ]
    proc = subprocess.run(["bash", str(LAUNCH), *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} on {ranks} rank(s) to step {steps} failed:\n{proc.stderr[-4000:]}")


def losses(run_dir: Path) -> dict[int, tuple[float, int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], int(r.get("world_size", 0))) for r in rows if "loss" in r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48, help="steps of the whole run; thirds on 2, 1, 2 ranks")
    p.add_argument("--png", default=None, help="where to write the plot (default: only the figures)")
    add_workdir_option(p)
    p.add_argument("extra", nargs="*", help="more key=value overrides for both runs")
    args = p.parse_args()

    with bench_workdir(args.workdir, "elastic-curve-bench-") as work:
        shards = work / "shards"
        if not (shards / "manifest.json").exists():
            subprocess.run(
                [sys.executable, "-m", "data_prep", "embedded", "--out", str(work / "tars")],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_prep",
                    "shard",
                    "--source",
                    str(work / "tars"),
                    "--out",
                    str(shards),
                    "--max-samples",
                    "250",
                    "--holdout-per-class",
                    "10",
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
        third = args.steps // 3
        launch(2, shards, work, "uninterrupted", args.steps, third, args.extra)
        for ranks, until in ((2, third), (1, 2 * third), (2, args.steps)):
            launch(ranks, shards, work, "elastic", until, third, args.extra)
        plain, elastic = losses(work / "uninterrupted"), losses(work / "elastic")
        if sorted(plain) != sorted(elastic) or sorted(plain) != list(range(1, args.steps + 1)):
            raise SystemExit(f"the runs logged different steps: {sorted(plain)} / {sorted(elastic)}")
        print(
            f"tiny recipe, {args.steps} steps; uninterrupted on 2 ranks vs 2 -> 1 -> 2 (resumed at steps "
            f"{third} and {2 * third})"
        )
        for lo, hi in ((1, third), (third + 1, 2 * third), (2 * third + 1, args.steps)):
            worlds = {elastic[s][1] for s in range(lo, hi + 1)}
            diff = max(abs(elastic[s][0] - plain[s][0]) / plain[s][0] for s in range(lo, hi + 1))
            print(
                f"steps {lo:3d}-{hi:3d}: world size {sorted(worlds)}, largest relative loss difference "
                f"{100 * diff:.2f}%"
            )
        if args.png:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            steps = sorted(plain)
            fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
            ax.plot(steps, [plain[s][0] for s in steps], color="0.35", lw=2.2, label="uninterrupted, 2 ranks")
            for lo, hi, ranks, colour in (
                (1, third, 2, "tab:blue"),
                (third, 2 * third, 1, "tab:orange"),
                (2 * third, args.steps, 2, "tab:blue"),
            ):
                seg = [s for s in steps if lo <= s <= hi]
                ax.plot(
                    seg,
                    [elastic[s][0] for s in seg],
                    color=colour,
                    lw=1.2,
                    ls="--",
                    label=f"elastic, {ranks} rank{'s' if ranks > 1 else ''}" if lo < 2 * third else None,
                )
            for s in (third, 2 * third):
                ax.axvline(s + 0.5, color="0.7", lw=0.8)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.set_title("Tiny recipe: stopped and resumed on 2 -> 1 -> 2 ranks, same run", fontsize=10)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(args.png)
            print(f"plot: {args.png}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
