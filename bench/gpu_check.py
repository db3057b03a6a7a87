"""The GPU checks of bench/gpu_check.sh that need their own code (the script runs the rest itself).

  data  OUT       the check's data: OUT/photos (real-photo JPEGs, ImageNet-like sizes) and OUT/digits (the
                  embedded dataset), both sharded with `python -m data_prep shard`.
  dali  SHARDS    DALI's `mixed` decode (nvJPEG on the GPU) against DALI's CPU decode on the same planned crops
                  and flips: mean absolute pixel difference (0-255 scale) over the first batches, and images/s of
                  one epoch each. Exit 1 when the difference is over --max-diff.
  fp16  RUN_DIR   reads a finished tiny fp16 run's metrics.jsonl: first and last logged loss, DeepSpeed's skipped
                  (overflow) steps and the last loss scale. Exit 1 unless the loss fell and the scale was dynamic.
  facts           this GPU as the project sees it: name, sm_XY, the precision `auto` picks, the torch and DALI
                  kernel checks (swin_common.gpu), the peak FLOP/s MFU uses. Exit 1 when a check fails.
  steps           tests/precision_probe.py on this GPU for ZeRO 0/2/3 in fp32, bf16 and fp16: the first step
                  against fp32's, a non-finite loss kept from the weights, and the host reads and synchronizing
                  CUDA calls (torch's sync debug mode) the project's code makes in a micro step. Exit 1 on any miss.

Each prints one line per figure, `name: value ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def data(args) -> int:
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prep_throughput import make_images

    out = Path(args.out)
    make_images(out / "photo_src", args.images, classes=10)
    prep = [sys.executable, "-m", "data_prep"]
    steps = [
        [*prep, "shard", "--source", out / "photo_src", "--out", out / "photos", "--workers", "4"],
        [*prep, "embedded", "--out", out / "digit_src"],
        [
            *prep,
            "shard",
            "--source",
            out / "digit_src",
            "--out",
            out / "digits",
            "--holdout-per-class",
            "20",
            "--max-samples",
            "256",
        ],
    ]
    for cmd in steps:
        subprocess.run(
            [str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1]
        )
    print(f"data: {args.images} photos in {out / 'photos'}, digits in {out / 'digits'}")
    return 0


def dali(args) -> int:
    import torch

    from pipeline.data.loader import LoaderConfig, create_loader
    from pipeline.data.samples import STD

    def loader(device: str):
        return create_loader(
            LoaderConfig(
                shards=args.shards,
                batch_size=args.batch_size,
                image_size=224,
                backend="dali",
                device=device,
                workers=4,
                seed=0,
            )
        )

    # the same planned crops and flips go to both decoders: only the decode and resize differ
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    diffs = []
    for (gpu_x, gpu_y), (cpu_x, cpu_y) in zip(loader(args.device), loader("cpu"), strict=False):
        assert torch.equal(gpu_y.cpu(), cpu_y), "the two loaders read different samples"
        diffs.append(((gpu_x.float().cpu() - cpu_x.float()).abs() * scale).mean().item())
        if len(diffs) == args.compare_batches:
            break
    if not diffs:
        raise SystemExit(f"error: {args.shards} holds fewer train images than one batch of {args.batch_size}")
    mean_diff = sum(diffs) / len(diffs)
    print(
        f"dali_mixed_vs_cpu_mean_abs_diff: {mean_diff:.3f} (0-255 scale, {len(diffs)} batches of "
        f"{args.batch_size}; bound {args.max_diff})"
    )
    for device in (args.device, "cpu"):
        data = loader(device)
        t_build = time.perf_counter()
        batches = iter(data)
        next(batches)  # pipeline build and first batch: timed apart (the loader builds one per epoch)
        if device == "cuda":
            torch.cuda.synchronize()
        print(
            f"dali_{'mixed' if device == 'cuda' else 'cpu'}_build_and_first_batch_s: "
            f"{time.perf_counter() - t_build:.3f}"
        )
        t0, images = time.perf_counter(), 0
        for x, _y in batches:
            images += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"dali_{'mixed' if device == 'cuda' else 'cpu'}_img_per_s: {images / (time.perf_counter() - t0):.0f}")
    return 0 if mean_diff <= args.max_diff else 1


def fp16(args) -> int:
    rows = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    first, last = train[0], train[-1]
    print(
        f"fp16_tiny_loss: first {first['loss']:.3f} (step {first['step']}), last {last['loss']:.3f} "
        f"(step {last['step']})"
    )
    print(f"fp16_tiny_skipped_steps: {last['skipped_steps']} (overflow steps DeepSpeed skipped and counted)")
    print(f"fp16_tiny_loss_scale: {last['loss_scale']}")
    return 0 if last["loss"] < first["loss"] and last["loss_scale"] is not None else 1


def facts(args) -> int:
    import torch

    from swin_common.gpu import (
        check_dali_kernels,
        check_torch_kernels,
        current_gpu,
        dali_package,
        peak_flops,
        precision_for,
        torch_arch_list,
    )

    gpu = current_gpu()
    precision = precision_for(gpu)
    print(
        f"gpu_facts: {gpu.name} {gpu.sm}, auto precision {precision}, torch {torch.__version__} archs "
        f"{' '.join(torch_arch_list())}, peak {peak_flops(gpu.name, precision)} FLOP/s"
    )
    check_torch_kernels(gpu, torch_arch_list(), torch.__version__)
    found = dali_package()
    if found is not None:
        check_dali_kernels(gpu, *found)
    print(f"gpu_kernel_checks: torch OK, {found[0] + ' ' + found[1] + ' OK' if found else 'no DALI installed'}")
    return 0


def steps(args) -> int:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    cases = [f"{stage}:{precision}" for stage in (0, 2, 3) for precision in ("fp32", "bf16", "fp16")]
    proc = subprocess.run(
        [sys.executable, str(repo / "tests" / "precision_probe.py"), *cases], cwd=repo, capture_output=True, text=True
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != len(cases):
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    ref, ok = rows[0], True
    for row in rows:
        moved = sum(row["update_abs"].values()) / sum(ref["update_abs"].values())
        guarded = row["nan_dropped"] if row["guard_on_host"] else row["nan_skipped"]
        quiet = row["guard_on_host"] or (not row["host_reads"] and not row["cuda_syncs"])
        good = row["stepped"] and abs(moved - 1) < 0.02 and row["nan_weights_unchanged"] and guarded and quiet
        ok &= good
        print(
            f"step_zero{row['stage']}_{row['precision']}: {'OK' if good else 'FAILED'} first-step update "
            f"{moved:.4f}x fp32's, non-finite loss {'dropped' if row['nan_dropped'] else 'skipped'}"
            f"{'' if row['nan_weights_unchanged'] else ' BUT THE WEIGHTS MOVED'}, host reads "
            f"{len(row['host_reads'])}, CUDA syncs from our code {len(row['cuda_syncs'])} {row['cuda_syncs'][:3]}"
        )
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="check", required=True)
    m = sub.add_parser("data")
    m.add_argument("out")
    m.add_argument("--images", type=int, default=2000)
    d = sub.add_parser("dali")
    d.add_argument("shards")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--compare-batches", type=int, default=8)
    d.add_argument("--max-diff", type=float, default=3.0, help="mean |mixed - cpu| bound, 0-255 scale")
    d.add_argument(
        "--device",
        default="cuda",
        help="cuda: DALI mixed against DALI CPU (cpu: the code path on a machine without a GPU, CPU against itself)",
    )
    f = sub.add_parser("fp16")
    f.add_argument("run_dir")
    sub.add_parser("facts")
    sub.add_parser("steps")
    args = p.parse_args()
    return {"data": data, "dali": dali, "fp16": fp16, "facts": facts, "steps": steps}[args.check](args)


if __name__ == "__main__":
    raise SystemExit(main())
