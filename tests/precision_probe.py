"""Run as a program by tests/test_precision.py (a world of one, its own process group): for each ZeRO stage and
precision given, builds the real engine (pipeline.engine.trainer.build_engine) of a tiny Swin from the same initial
weights and takes one optimizer step on a fixed batch, then one on a batch whose loss is not finite, through
pipeline.engine.step.micro_step; prints one JSON line per case:

  update      per parameter: the fp32 master weights after the first step minus before (sum of |delta|, and
              the signs as a list for the head weight)
  nan         whether the weights (fp32 master) are bit-identical after the non-finite batch, and how the step
              reported it (dropped before the backward / skipped by DeepSpeed)
  host_reads  .item()/bool()/tolist() calls made by the project's code in the good micro step (SyncCounter)
  cuda_syncs  on a GPU, the synchronizing CUDA calls torch reports from the project's code in that step
  overflow    ZeRO-0 fp16 (autocast + GradScaler): a step whose loss-scaled gradients overflow is skipped,
              counted in skipped_steps, the weights untouched, the scale lowered

usage: python tests/precision_probe.py STAGE:PRECISION [...]   e.g. 0:fp32 2:bf16
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.numpy,
}


# ops whose output size depends on the data: the host must wait for the GPU to size the result
DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device (each one a GPU -> CPU sync on a GPU): value reads
    (.item(), bool(), .tolist(), ...), boolean-mask indexing and other data-dependent shapes; only those made
    from files under `prefix` (the project's code, not DeepSpeed's own)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.calls = prefix, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or func in DATA_DEPENDENT or (func is torch.Tensor.__getitem__ and _bool_index(args)):
            frame = sys._getframe(1)
            while frame is not None and "torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.prefix):
                self.calls.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_syncs():
    """On a GPU, torch's own sync detector (torch.cuda.set_sync_debug_mode): the list fills with file:line of
    every synchronizing call made from the project's code (DeepSpeed's own syncs in its step are left out)."""
    found: list[str] = []
    if not torch.cuda.is_available():
        yield found
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    prefix = str(REPO / "pipeline")
    found += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if w.filename.startswith(prefix)]


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if full is None else full).float().clone()
    return out


def probe(stage: int, precision: str, world) -> dict:
    from pipeline.config import load_config
    from pipeline.engine.optim import StepPlan, deepspeed_skips_nonfinite, loss_scale, skipped_steps
    from pipeline.engine.step import StepTally, micro_step
    from pipeline.engine.trainer import build_engine

    cfg = load_config(
        REPO / "configs" / "tiny_22k.yaml",
        [
            "train.global_batch=8",
            "train.micro_batch=8",
            f"train.zero_stage={stage}",
            f"train.precision={precision}",
            "model.drop_path=0",
            "optim.base_lr=1e-3",
            "optim.lr_batch_base=8",
            "optim.grad_clip=0",
        ],
    )
    plan = StepPlan(8, 1, 10, 10, 0)
    engine, _ = build_engine(cfg, world, plan, [f"n{i:08d}" for i in range(10)], precision)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    dtype = engine.module.patch_embed.proj.weight.dtype  # what the loader would hand this engine: bf16 or fp32
    images, labels = images.to(engine.device, dtype), labels.to(engine.device)
    before = fp32_weights(engine)
    counter = SyncCounter(str(REPO / "pipeline"))
    guard = not deepspeed_skips_nonfinite(stage, precision)
    with counter, cuda_syncs() as syncs:
        good = micro_step(engine, images, labels, 0.0, StepTally(), guard)
    after = fp32_weights(engine)
    bad = micro_step(engine, torch.full_like(images, float("nan")), labels, 0.0, StepTally(), guard)
    after_nan = fp32_weights(engine)
    overflow = None
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:  # ZeRO-0 fp16: a loss scale so large that the fp16 gradients overflow -> GradScaler skips
        scale_before = loss_scale(engine)
        scaler.update(new_scale=2.0**60)
        result = micro_step(engine, images, labels, 0.0, StepTally(), guard)
        overflow = {
            "scale_before": scale_before,
            "skipped_steps": skipped_steps(engine),
            "weights_unchanged": all(torch.equal(after_nan[k], v) for k, v in fp32_weights(engine).items()),
            "scale_after": loss_scale(engine),
            "stepped": result.stepped,
        }
    head = "head.fc.weight"
    return {
        "stage": stage,
        "precision": precision,
        "module_dtype": str(dtype),
        "guard_on_host": guard,
        "stepped": good.stepped and not good.skipped,
        "update_abs": {k: (after[k] - before[k]).abs().sum().item() for k in before},
        "head_signs": torch.sign(after[head] - before[head]).flatten().tolist(),
        "nan_weights_unchanged": all(torch.equal(after[k], after_nan[k]) for k in after),
        "nan_dropped": bad.dropped,
        "nan_skipped": bad.skipped,
        "skipped_steps": int(engine.skipped_steps),
        "host_reads": counter.calls,
        "cuda_syncs": syncs,  # on a GPU: the synchronizing CUDA calls torch reported from the project's code
        "loss_scale": loss_scale(engine),
        "overflow": overflow,
    }


def main() -> int:
    from pipeline.engine.distributed import init_distributed

    world = init_distributed()
    for case in sys.argv[1:]:
        stage, precision = case.split(":")
        print(json.dumps(probe(int(stage), precision, world)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
