"""create_model: timm's Swin Transformer (no re-implementation) at any image size and window.

The variants are the paper's T/S/B/L (its Table 7) plus `swin_nano`, a small CPU twin for the tiny recipes (same
block design, C=32, depths 2-2-2-2, head dim 32). `create_model` builds timm's registered base architecture with
the size, window, classes, drop path rate, gradient checkpointing and attention kernel of the run; an exported
model's model.json records arch, size, window and `timm_kwargs`, from which `create_model` rebuilds it.
`timm_name` is timm's name of the architecture at that size (swin_base_patch4_window12_384), for people and
the registry's tags; swin_nano has none registered in timm.
"""

from __future__ import annotations

from typing import cast

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch.utils.flop_counter import FlopCounterMode

from swin_common.errors import UserError

# name -> (timm base architecture, overrides of that architecture)
VARIANTS: dict[str, tuple[str, dict]] = {
    "swin_nano": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small": ("swin_small_patch4_window7_224", {}),
    "swin_base": ("swin_base_patch4_window7_224", {}),
    "swin_large": ("swin_large_patch4_window7_224", {}),
}


class ArchError(UserError, ValueError):
    """An architecture (model.arch, an export's arch) or image size no variant here builds."""


def timm_name(arch: str, img_size: int, window_size: int) -> str:
    """timm's naming of the architecture at this size, e.g. swin_base_patch4_window12_384."""
    base = _variant(arch)[0]
    return (
        base.replace("window7_224", f"window{window_size}_{img_size}")
        if arch != "swin_nano"
        else f"swin_nano_patch4_window{window_size}_{img_size}"
    )


def timm_kwargs(arch: str, img_size: int, window_size: int, num_classes: int, drop_path: float = 0.0) -> dict:
    return dict(
        img_size=img_size,
        window_size=window_size,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        **_variant(arch)[1],
    )


def create_model(
    arch: str,
    img_size: int = 224,
    window_size: int = 7,
    num_classes: int = 1000,
    drop_path: float = 0.0,
    grad_checkpointing: bool = False,
    fused_attn: bool = True,
) -> torch.nn.Module:
    if img_size % 32:
        raise ArchError(f"img_size {img_size} is not a multiple of 32 (patch 4 x three 2x merges)")
    # every variant is timm's SwinTransformer; timm.create_model is typed as returning an nn.Module
    model = cast(
        SwinTransformer,
        timm.create_model(
            _variant(arch)[0], pretrained=False, **timm_kwargs(arch, img_size, window_size, num_classes, drop_path)
        ),
    )
    set_fused_attn(model, fused_attn)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """timm reads TIMM_FUSED_ATTN once per module at construction; this switches a built model."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            # torch's Module.__setattr__ stub takes Tensor | Module only; a bool is a plain attribute at runtime
            module.fused_attn = enabled  # type: ignore[assignment]


def _variant(arch: str) -> tuple[str, dict]:
    try:
        return VARIANTS[arch]
    except KeyError:
        raise ArchError(f"unknown arch {arch!r}; choose one of {', '.join(VARIANTS)}") from None


def forward_flops(arch: str, img_size: int, window_size: int, num_classes: int) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add of every matmul, convolution and attention), counted
    by torch's FlopCounterMode on the meta device: no memory, no compute. Training counts 3x (forward + backward,
    which MFU's convention takes as twice the forward; recomputation under grad checkpointing is not counted)."""

    with torch.device("meta"):
        model = create_model(arch, img_size, window_size, num_classes, fused_attn=False)
        x = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())
