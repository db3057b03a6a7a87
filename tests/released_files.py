"""Files of released Swins as their producers make them, for the tests: Microsoft's official layout made from a
timm model by its documented renames (torch.save, as the official code saves), from a model whose weights are moved
off their initialisation."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model in eval mode with every weight moved off its initialisation (zero tables, unit norms...)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def microsoft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The official layout by its documented renames: each stage's patch merging at the end of the stage before,
    `head.fc.` -> `head.`, plus the persistent buffers the official model saves (relative_position_index in every
    block, attn_mask in the shifted ones), which timm's modules hold as non-persistent buffers."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state[key.replace("head.fc.", "head.")] = value.clone()
    for name, module in model.named_modules():
        for buffer in ("relative_position_index", "attn_mask"):
            if isinstance(getattr(module, buffer, None), torch.Tensor):
                state[f"{name}.{buffer}"] = getattr(module, buffer).clone()
    return state


def microsoft_release(model: torch.nn.Module, path: Path) -> Path:
    """`path`: a release file of `model` as Microsoft's are (a dict holding `model`, the official layout)."""
    torch.save({"model": microsoft_state(model)}, path)
    return path
