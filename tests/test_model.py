"""The timm Swin factory against the paper's Table 1 (../shared/SWIN_FACTS.md), the fused attention switch,
gradient checkpointing, and the CPU twin."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import VARIANTS, create_model, timm_name

# (arch, image size, window, accepted parameter counts in M after rounding, GMACs): the paper's Table 1;
# Swin-T is 29M in the paper's table and 28M in the official README (28.29M counted).
TABLE_1 = [
    ("swin_tiny", 224, 7, {28, 29}, 4.5),
    ("swin_small", 224, 7, {50}, 8.7),
    ("swin_base", 224, 7, {88}, 15.4),
    ("swin_large", 224, 7, {197}, 34.5),
    ("swin_base", 384, 12, {88}, 47.0),
    ("swin_large", 384, 12, {197}, 103.9),
]


def count(arch: str, size: int, window: int) -> tuple[float, float]:
    """(parameters in M, multiply-adds in G) of one 1000-class forward, on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = create_model(arch, size, window, num_classes=1000)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 2e9  # FLOPs = 2 x MACs


@pytest.mark.parametrize("arch,size,window,params_m,gmacs", TABLE_1, ids=[f"{a}-{s}" for a, s, *_ in TABLE_1])
def test_parameters_and_flops_match_table_1(arch, size, window, params_m, gmacs):
    params, macs = count(arch, size, window)
    assert round(params) in params_m, f"{params:.2f}M parameters"
    assert abs(macs - gmacs) / gmacs < 0.01, f"{macs:.3f} GMACs vs the paper's {gmacs}"


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_every_variant_builds_with_the_layout_class_count(arch):
    with torch.device("meta"):
        model = create_model(arch, 224, 7, num_classes=21841)
    assert model.head.fc.out_features == 21841
    assert model.patch_embed.proj.kernel_size == (4, 4)


def test_window_12_at_384_sets_23x23_bias_tables():
    with torch.device("meta"):
        model = create_model("swin_base", 384, 12)
    tables = {name: p.shape for name, p in model.named_parameters() if "relative_position_bias_table" in name}
    # stages at 384: 96, 48, 24, 12 tokens per side; the last stage's window is the whole 12x12 map
    assert all(shape[0] == 23 * 23 for shape in tables.values()), tables
    assert timm_name("swin_base", 384, 12) == "swin_base_patch4_window12_384"


@pytest.mark.parametrize("arch,size,window", [("swin_nano", 64, 4), ("swin_tiny", 224, 7)])
def test_fused_attention_gives_the_eager_outputs(arch, size, window):
    torch.manual_seed(0)
    model = create_model(arch, size, window, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fused = model(x)
        from pipeline.model import set_fused_attn

        set_fused_attn(model, False)
        eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)  # the kernels round differently, within fp32


def test_fused_switch_reaches_every_attention_module():
    model = create_model("swin_nano", 64, 4, num_classes=10, fused_attn=False)
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("swin_nano", 64, 4, num_classes=10)
    ckpt = create_model("swin_nano", 64, 4, num_classes=10, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(x).square().mean().backward()
        grads.append(model.patch_embed.proj.weight.grad)
    assert all(stage.grad_checkpointing for stage in ckpt.layers)
    torch.testing.assert_close(grads[0], grads[1])


def test_unknown_arch_and_bad_size_are_errors():
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("swin_huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("swin_tiny", img_size=200)
