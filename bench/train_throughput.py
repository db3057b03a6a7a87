"""Training-step throughput of our DeepSpeed path against a plain PyTorch loop, and per-rank optimizer-state
memory of ZeRO 0/1/2/3 at world sizes 1/2/4 against the ZeRO paper's accounting.

Throughput: the same timm Swin, batch, dtype, AdamW param groups and gradient clipping; "ours" is
pipeline.engine.step.micro_step on the DeepSpeed engine built by pipeline.engine.trainer.build_engine (the code the
trainer runs), "plain" is forward -> loss -> backward -> clip -> AdamW step -> zero_grad. Both take the same
in-memory batch (the loader has its own bench), alternate for R rounds in this process, and report the median
step time. In bf16/fp16 "plain" is PyTorch's AMP (autocast over fp32 weights), which is what ZeRO-0 runs too. On a GPU
it also prints Swin images/s and MFU (training FLOPs per image = 3 x 2 x the model's MACs).

Memory: per rank, the bytes the optimizer keeps (fp32 master weights + Adam's two moments; what ZeRO 1-3
partition) after one bf16 step, measured on live tensors in 1, 2 and 4 gloo processes, against the theory for
mixed precision: optimizer states 12 B/param for DDP and 12/N for ZeRO 1-3, on top of params and grads:
DDP 16 B/param in all, ZeRO-1 4+12/N, ZeRO-2 2+14/N, ZeRO-3 16/N.

The last line is `ratio_vs_plain: X.XX`: our step time / plain step time on one rank, where the engine runs
ZeRO-0 (ZeRO-1..3 on a world of one partition nothing; their bucket copies are shown on their own row).
Target: <= 1.05 on CPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.engine.optim import create_optimizer, deepspeed_skips_nonfinite, plan_steps, resolve_precision
from pipeline.engine.step import loss_fn, micro_step
from pipeline.model import create_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_config(arch: str, size: int, window: int, batch: int, world: int, stage: int, precision: str):
    return load_config(
        None,
        [
            f"model.arch={arch}",
            f"model.img_size={size}",
            f"model.window_size={window}",
            "model.drop_path=0.1",
            f"train.global_batch={batch * world}",
            f"train.micro_batch={batch}",
            f"train.zero_stage={stage}",
            f"train.precision={precision}",
            "schedule.warmup_epochs=0",
        ],
    )


def build(cfg, world, precision: str, num_classes: int):
    from pipeline.engine.trainer import build_engine

    plan = plan_steps(cfg, world.size, micro_batches_per_epoch=10**6)
    engine, _ = build_engine(cfg, world, plan, [f"class{i}" for i in range(num_classes)], precision)
    return engine


def plain_loop(cfg, num_classes: int, device, dtype):
    """PyTorch's own mixed-precision loop (AMP): fp32 weights, the forward under torch.autocast in bf16/fp16
    (fp16 with a GradScaler), fp32 gradients and AdamW; the loss stays on the device."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = create_model(m.arch, m.img_size, m.window_size, num_classes, m.drop_path, fused_attn=m.fused_attn)
    model = model.to(device=device)
    opt = create_optimizer(model, cfg)
    low = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=low):
            loss = loss_fn(model(x), y, cfg.data.label_smoothing)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, x, y, n: int, device) -> float:
    """Median seconds per step over n steps."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(args) -> float:
    """Median step times of our step at ZeRO-0 (what one device needs: nothing to partition) and at
    --zero-stage, against the plain loop; returns ours(ZeRO-0) / plain."""
    from pipeline.engine.distributed import init_distributed

    world = init_distributed()
    precision = resolve_precision(args.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[precision]
    variants = {}
    for stage in dict.fromkeys((0, args.zero_stage)):
        cfg = run_config(args.arch, args.img_size, args.window, args.batch, 1, stage, precision)
        engine = build(cfg, world, precision, args.classes)
        guard = not deepspeed_skips_nonfinite(stage, precision)  # as the training loop decides it
        variants[f"ours ZeRO-{stage}"] = lambda x, y, e=engine, c=cfg, g=guard: micro_step(
            e, x, y, c.data.label_smoothing, guard_on_host=g
        )
    variants["plain"] = plain_loop(cfg, args.classes, device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device, dtype)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    for step in variants.values():  # warm-up: allocator, kernels, lazy state
        for _ in range(2):
            step(x, y)
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):  # variants interleaved step by step, so drift on the machine hits all alike
        for name, step in variants.items():
            rounds[name].append(timed(step, x, y, 1, device))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(
        f"\nthroughput: {args.arch} {args.img_size}px window {args.window}, batch {args.batch}, {precision}, "
        f"{device.type}, one rank, median of {args.rounds} interleaved steps each"
    )
    for name, t in med.items():
        spread = f"{args.batch / max(rounds[name]):.1f}-{args.batch / min(rounds[name]):.1f}"
        print(
            f"  {name:12s} {t * 1000:8.1f} ms/step  {args.batch / t:8.1f} img/s  x{t / med['plain']:.2f} of plain  "
            f"(range {spread} img/s)"
        )
    if device.type == "cuda":
        report_mfu(args, precision, med)
    return med["ours ZeRO-0"] / med["plain"]


def report_mfu(args, precision: str, med: dict[str, float]) -> None:
    """MFU of each variant, as the training log computes it (pipeline.model.forward_flops, swin_common.gpu)."""
    from pipeline.model import forward_flops
    from swin_common.gpu import mfu, peak_flops

    forward = forward_flops(args.arch, args.img_size, args.window, args.classes)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, precision)
    for variant, t in med.items():
        images_per_s = args.batch / t
        share = (
            f"MFU {100 * mfu(images_per_s, forward, peak):.1f}% of {peak / 1e12:.0f} TFLOP/s"
            if peak
            else f"no peak for {name} in {precision}"
        )
        print(f"mfu: {variant}: {images_per_s:.1f} img/s x {3 * forward / 1e9:.1f} GFLOP/img on {name}, {share}")


def optimizer_bytes(engine) -> int:
    """Bytes of the fp32 master weights and Adam moments this rank holds (the torch optimizer inside
    DeepSpeed's wrappers: its params are the fp32 partitions, its state the moments)."""
    wrapper = inner = engine.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    tensors = [p for g in inner.param_groups for p in g["params"]]
    # the fp32 master partitions, where the wrapper keeps them outside the torch optimizer between steps
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO 1-2, ZeRO-3
        tensors += [t for t in getattr(wrapper, name, []) if torch.is_tensor(t)]
    tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen and t.numel() > 0:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def memory_rank(rank: int, world_size: int, port: int, args, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from pipeline.engine.distributed import init_distributed

    world = init_distributed()
    for stage in (0, 1, 2, 3):
        cfg = run_config(args.memory_arch, 64, 4, 2, world_size, stage, "bf16")
        engine = build(cfg, world, "bf16", 10)
        x, y = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16), torch.randint(0, 10, (2,))
        micro_step(engine, x, y, 0.1)
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
        queue.put((world_size, stage, rank, optimizer_bytes(engine), params))
        engine.destroy()
        del engine
        gc.collect()
    from pipeline.engine.distributed import shutdown

    shutdown()


def memory(args) -> None:
    from pipeline.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    rows = []
    for world_size in args.memory_worlds:
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=memory_rank, args=(r, world_size, port, args, queue)) for r in range(world_size)]
        for p in procs:
            p.start()
        for _ in range(4 * world_size):
            rows.append(queue.get(timeout=600))
        for p in procs:
            p.join()
    print(
        f"\noptimizer-state bytes per rank ({args.memory_arch}, bf16; fp32 master + Adam moments), measured vs theory"
    )
    print(f"  {'ZeRO':>4} {'world':>5} {'B/param measured':>17} {'theory':>7}  {'all model states, theory':>24}")
    theory_total = {0: lambda n: 16, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}
    for stage in (0, 1, 2, 3):
        for world_size in args.memory_worlds:
            mine = [r for r in rows if r[0] == world_size and r[1] == stage]
            per_param = max(r[3] for r in mine) / mine[0][4]
            theory = 12 if stage == 0 else 12 / world_size
            print(
                f"  {stage:>4} {world_size:>5} {per_param:>17.2f} {theory:>7.2f}  "
                f"{theory_total[stage](world_size):>24.2f}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="swin_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--rounds", type=int, default=21, help="timed steps per variant, interleaved")
    p.add_argument("--memory-arch", default="swin_nano")
    p.add_argument(
        "--memory-worlds",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=[1, 2, 4],
        help="world sizes for the memory table ('' to skip)",
    )
    args = p.parse_args()
    if args.memory_worlds:
        memory(args)  # first, in child processes, before this process joins a process group
    ratio = throughput(args)
    print(f"ratio_vs_plain: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
