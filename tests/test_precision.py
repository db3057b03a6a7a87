"""Every GPU gets the precision it supports, and every ZeRO stage x precision trains right from the first step.

On CPU: the precision choice, the kernel checks and the MFU table for V100, A100, H100 and H200 (their device
facts and the arch lists of the torch builds they would meet); the GPU each rank drives under every Slurm
binding; and, on real DeepSpeed engines (tests/precision_probe.py, its own process group), the first optimizer
step of ZeRO 0-3 in fp32 and bf16 against fp32's, a non-finite loss that never reaches the weights and is
counted, and the host reads the project's code makes in a micro step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.engine.distributed import cuda_device_index
from pipeline.engine.optim import deepspeed_config, plan_steps, resolve_precision
from runs import job_env
from servers import REPO
from swin_common.gpu import (
    Gpu,
    UnsupportedGPU,
    check_dali_kernels,
    check_torch_kernels,
    has_kernels,
    mfu,
    peak_flops,
    precision_for,
)

V100 = Gpu("Tesla V100-SXM2-32GB", (7, 0))
V100_PCIE = Gpu("Tesla V100-PCIE-16GB", (7, 0))
A100 = Gpu("NVIDIA A100-SXM4-80GB", (8, 0))
H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0))
H100_PCIE = Gpu("NVIDIA H100 PCIe", (9, 0))
H200 = Gpu("NVIDIA H200", (9, 0))
CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()  # torch 2.14.1+cu130 (torch._C._cuda_getArchFlags())
CU126 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90".split()  # PyTorch's CUDA 12.6 builds (legacy archs)


@pytest.mark.parametrize("gpu, precision", [(V100, "fp16"), (A100, "bf16"), (H100, "bf16"), (H200, "bf16")])
def test_auto_picks_bf16_only_from_ampere_on(gpu, precision):
    assert precision_for(gpu) == precision
    assert resolve_precision("auto", gpu) == precision
    assert resolve_precision("fp16", gpu) == "fp16"


def test_bf16_asked_on_a_v100_is_refused_with_what_to_use():
    with pytest.raises(UnsupportedGPU, match=r"bf16 on Tesla V100-SXM2-32GB \(sm_70\).*fp16 or auto"):
        resolve_precision("bf16", V100)
    assert resolve_precision("auto", None) == "fp32"


@pytest.mark.parametrize(
    "gpu, arch_list, ok",
    [
        (V100, CU130, False),
        (V100, CU126, True),
        (A100, CU130, True),
        (H100, CU130, True),
        (H200, CU130, True),
        (Gpu("NVIDIA A10", (8, 6)), ["sm_80"], True),  # a cubin runs on a later minor of its major
        (Gpu("NVIDIA A100", (8, 0)), ["sm_86"], False),  # ... never on an earlier one
        (H100, ["sm_80", "compute_80"], True),  # PTX of a lower capability is compiled by the driver
        (H100, ["sm_80"], False),
        (Gpu("GH200", (9, 0)), ["sm_90a"], True),
        (Gpu("future", (9, 1)), ["sm_90a"], False),  # an arch-specific build runs on that arch only
    ],
)
def test_the_kernel_check_follows_cuda_binary_compatibility(gpu, arch_list, ok):
    assert has_kernels(gpu, arch_list) is ok


def test_a_v100_with_the_cuda13_torch_stops_with_one_line_naming_gpu_arch_and_install():
    with pytest.raises(UnsupportedGPU) as e:
        check_torch_kernels(V100, CU130, "2.14.1+cu130")
    message = str(e.value)
    assert "\n" not in message
    for part in (
        "Tesla V100-SXM2-32GB",
        "sm_70",
        "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120",
        "2.14.1+cu130",
        "SWIN_CUDA=cu126",
    ):
        assert part in message, (part, message)
    check_torch_kernels(V100, CU126, "2.14.1+cu126")
    check_torch_kernels(H200, CU130, "2.14.1+cu130")


def test_dali_builds_are_checked_by_their_cuda_major():
    with pytest.raises(UnsupportedGPU, match=r"nvidia-dali-cuda130 2.4.0 has no kernels for Tesla V100.*sm_75"):
        check_dali_kernels(V100, "nvidia-dali-cuda130", "2.4.0")
    check_dali_kernels(V100, "nvidia-dali-cuda120", "2.4.0")
    for gpu in (A100, H100, H200):
        check_dali_kernels(gpu, "nvidia-dali-cuda130", "2.4.0")


def test_the_installed_dali_is_named_as_found():
    from pipeline.tracking.params import package_versions
    from swin_common.gpu import dali_package

    found = dali_package()
    assert found is not None and found[0].startswith("nvidia-dali-cuda")
    assert package_versions()[f"version.{found[0]}"] == found[1]


@pytest.mark.parametrize(
    "gpu, precision, peak",
    [
        (V100, "fp16", 125e12),
        (V100_PCIE, "fp16", 112e12),
        (Gpu("Tesla V100S-PCIE-32GB", (7, 0)), "fp16", 130e12),
        (V100, "bf16", None),
        (A100, "bf16", 312e12),
        (H100, "bf16", 989e12),
        (H100_PCIE, "bf16", 756e12),
        (H200, "bf16", 989e12),
        (H200, "fp32", None),
    ],
)
def test_peak_flops_per_gpu_kind(gpu, precision, peak):
    assert peak_flops(gpu.name, precision) == peak


def test_model_flops_match_timms_published_figures_and_give_mfu():
    from pipeline.model import forward_flops

    # timm's model cards: swin_tiny 4.5 GMACs, swin_base 15.4 GMACs at 224, 47.1 at 384 (2 FLOPs per MAC)
    assert forward_flops("swin_tiny", 224, 7, 1000) / 2e9 == pytest.approx(4.5, rel=0.01)
    base = forward_flops("swin_base", 224, 7, 21841)
    assert base / 2e9 == pytest.approx(15.4 + 1024 * 21841 / 1e9 - 1024 * 1000 / 1e9, rel=0.01)
    assert forward_flops("swin_base", 384, 12, 1000) / 2e9 == pytest.approx(47.1, rel=0.01)
    # 1,000 img/s per H100 of Swin-B 224 in bf16: 3 x 30.9 GFLOP x 1,000 / 989 TFLOP/s
    assert mfu(1000, base, 989e12) == pytest.approx(3 * base * 1000 / 989e12)


@pytest.mark.parametrize(
    "env, count, device",
    [
        ({"LOCAL_RANK": "5"}, 8, 5),  # unbound: every task sees the node's 8 GPUs
        ({"LOCAL_RANK": "5", "SLURM_LOCALID": "5"}, 1, 0),  # srun --gpus-per-task=1 / --gpu-bind=single:1
        ({"LOCAL_RANK": "0"}, 1, 0),
        ({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4, 3),  # restricted: index among the visible ones
    ],
)
def test_the_gpu_a_rank_drives_under_every_binding(env, count, device):
    assert cuda_device_index(env, count) == device


def test_more_ranks_than_visible_gpus_is_an_error_naming_both():
    with pytest.raises(
        RuntimeError,
        match=r"LOCAL_RANK=5 but this node has 4 visible GPU\(s\) "
        r"\(CUDA_VISIBLE_DEVICES=4,5,6,7\).*--gpus-per-task=1",
    ):
        cuda_device_index({"LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_deepspeed_config_of_each_stage_keeps_fp32_masters_and_accumulation(stage):
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "swin_base_22k.yaml", [f"train.zero_stage={stage}"])
    plan = plan_steps(cfg, 32, 10_000)
    bf16, fp16 = deepspeed_config(cfg, plan, 32, "bf16"), deepspeed_config(cfg, plan, 32, "fp16")
    if stage == 0:  # torch autocast over fp32 weights, not DeepSpeed's FP16_UnfusedOptimizer
        assert not bf16["bf16"]["enabled"] and bf16["torch_autocast"]["dtype"] == "bfloat16"
        assert not fp16["fp16"]["enabled"] and fp16["torch_autocast"]["dtype"] == "float16"
    else:
        assert bf16["bf16"]["enabled"]
        # fp32 accumulation where DeepSpeed can also export it (not ZeRO-1's BF16_Optimizer: optim.deepspeed_config)
        assert bf16.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if stage > 1 else None)
        assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    if stage in (1, 2):
        zero = bf16["zero_optimization"]
        assert zero["overlap_comm"] and zero["reduce_bucket_size"] < 88_000_000  # Swin-B goes in several buckets


CASES = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")] + [(0, "fp16")]


@pytest.fixture(scope="module")
def probes() -> dict[tuple[int, str], dict]:
    # fp16 at ZeRO-0 is torch autocast + GradScaler, which runs on CPU too; ZeRO 1-3 fp16 need a GPU (gpu_check)
    cases = [f"{stage}:{precision}" for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")] + ["0:fp16"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "precision_probe.py"), *cases],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=job_env(port=False),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases)
    return {(r["stage"], r["precision"]): r for r in rows}


@pytest.mark.parametrize("stage, precision", CASES)
def test_the_first_optimizer_step_matches_fp32s(probes, stage, precision):
    """The fp32 master weights move as fp32 ZeRO-0's do on the same batch (AdamW's first step: about lr per
    element plus weight decay). DeepSpeed's ZeRO-0 bf16 (FP16_UnfusedOptimizer) ran a zero-gradient step at
    set-up, which moved the head by 0.44x this; autocast at ZeRO-0 does not."""
    ref, row = probes[(0, "fp32")], probes[(stage, precision)]
    assert row["stepped"]
    total = sum(row["update_abs"].values()) / sum(ref["update_abs"].values())
    assert total == pytest.approx(1.0, abs=0.02)
    # weights (not biases: the key bias has no gradient at all, its update is rounding noise amplified by Adam)
    weights = [k for k in ref["update_abs"] if k.endswith("weight")]
    ratios = {k: row["update_abs"][k] / ref["update_abs"][k] for k in weights}
    assert all(abs(r - 1) < 0.1 for r in ratios.values()), {k: r for k, r in ratios.items() if abs(r - 1) >= 0.1}
    agree = sum(a == b for a, b in zip(row["head_signs"], ref["head_signs"], strict=True)) / len(ref["head_signs"])
    assert agree > 0.98
    if precision != "fp32":
        assert row["module_dtype"] == ("torch.float32" if stage == 0 else "torch.bfloat16")


@pytest.mark.parametrize("stage, precision", CASES)
def test_a_non_finite_loss_never_reaches_the_weights_and_is_counted(probes, stage, precision):
    row = probes[(stage, precision)]
    assert row["nan_weights_unchanged"]
    if row["guard_on_host"]:  # checked before the backward: dropped
        assert row["nan_dropped"] and not row["nan_skipped"]
    else:  # DeepSpeed skipped the step and counted it
        assert row["nan_skipped"] and row["skipped_steps"] == 1


@pytest.mark.parametrize("stage, precision", CASES)
def test_a_micro_step_reads_nothing_on_the_host_where_deepspeed_guards_the_weights(probes, stage, precision):
    row = probes[(stage, precision)]
    expected = ["distributed.py"] if row["guard_on_host"] else []  # all_true's one read of the reduced flag
    assert [call.split(":")[0] for call in row["host_reads"]] == expected, row["host_reads"]
    assert row["guard_on_host"] == (stage == 0 or stage == 3)  # the shipped recipes (ZeRO-2) read nothing


def test_evaluation_sums_a_batch_without_reading_the_host():
    import torch.nn.functional as F
    from precision_probe import SyncCounter

    from pipeline.engine.validation import batch_sums

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, -1, -1])  # two padding entries
    counter = SyncCounter(str(REPO / "pipeline"))
    with counter:
        sums = batch_sums(logits, labels)
    assert counter.calls == []
    real = labels >= 0
    kept_logits, kept = logits[real], labels[real]
    top = kept_logits.topk(5, dim=1).indices
    expected = [
        F.cross_entropy(kept_logits, kept, reduction="sum").item(),
        (top[:, 0] == kept).sum().item(),
        (top == kept[:, None]).any(1).sum().item(),
        8,
    ]
    assert sums.tolist() == pytest.approx(expected)


def test_the_sync_counter_sees_what_makes_the_host_wait():
    from precision_probe import SyncCounter

    counter = SyncCounter(__file__)
    x = torch.randn(6)
    with counter:
        x[x > 0]  # boolean-mask indexing: the result's size is known only once the mask is
        bool(x.sum() > 0)
        x.max().item()
        x.tolist()
        x * 2  # no read
    assert [c.split(" ")[1] for c in counter.calls] == ["__getitem__", "__bool__", "item", "tolist"]


def test_a_zero0_checkpoint_with_16_bit_weights_is_refused_with_what_to_do(tmp_path):
    """Checkpoints of DeepSpeed's own ZeRO-0 bf16 (before ZeRO-0 moved to autocast over fp32 weights) hold a 16-bit
    module and FP16_UnfusedOptimizer state, which does not load into today's fp32 engine."""
    from pipeline.engine.checkpoint import check_zero0_weights_dtype

    torch.save({"module": {"w": torch.zeros(2, dtype=torch.bfloat16)}}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(
        RuntimeError,
        match=rf"{tmp_path} holds ZeRO-0 weights in bfloat16.*init_from={tmp_path} "
        r"checkpoint.resume=none",
    ):
        check_zero0_weights_dtype(tmp_path, torch.float32)
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "mp_rank_00_model_states.pt")
    check_zero0_weights_dtype(tmp_path, torch.float32)


def test_zero0_fp16_logs_its_loss_scale_and_counts_the_steps_its_grad_scaler_skips(probes):
    """DeepSpeed's ZeRO-0 fp16 optimizer had `cur_scale` nowhere (the log said None); autocast's GradScaler has a
    scale, and the steps it skips on overflow are counted from AdamW's own step count."""
    row = probes[(0, "fp16")]
    assert row["loss_scale"] is not None and row["overflow"]["scale_before"] == 2.0**16  # GradScaler's start
    overflow = row["overflow"]
    assert overflow["stepped"] and overflow["weights_unchanged"] and overflow["skipped_steps"] == 1
    assert overflow["scale_after"] == 2.0**59  # halved after the overflow
    assert probes[(2, "bf16")]["loss_scale"] is None and probes[(2, "bf16")]["overflow"] is None
