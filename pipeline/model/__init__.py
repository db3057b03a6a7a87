"""The model: timm's Swin factory (swin.py) and the transfer of trained weights to another size, window and label
layout (transfer.py)."""

from .swin import VARIANTS, create_model, forward_flops, set_fused_attn, timm_kwargs, timm_name

__all__ = ["VARIANTS", "create_model", "forward_flops", "set_fused_attn", "timm_kwargs", "timm_name"]
