"""Initialise a model from one trained at another image size, window and label layout (22K -> 1K at 384).

- Every `relative_position_bias_table`, (2M-1)^2 rows x heads, is resized per head as a (2M-1)x(2M-1) grid with
  bicubic interpolation (timm's `resize_rel_pos_bias_table_simple`: `F.interpolate(..., mode="bicubic",
  align_corners=False)`), as the paper and the official code do: 13x13 -> 23x23 for window 7 -> 12. (timm's
  `resize_rel_pos_bias_table` resamples BEiT-style; it is not used.) `transfer.bias_tables: zeros` starts them at
  zero instead, for comparison.
- `relative_position_index` and `attn_mask` are buffers the model rebuilds for its own window and resolution;
  they are never copied (timm does not save them).
- The classifier rows follow the synsets: target label i takes the source row of the same synset
  (data_prep.shardset.layout.map_layouts, what `data_prep map` writes); synsets the source never saw keep the target
  model's fresh initialisation and are reported. `transfer.head: fresh` re-initialises the whole head.
- Any other difference is an error naming the key: a head count that changed, a missing or extra weight,
  another shape.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field

import torch
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple

from data_prep.shardset.layout import map_layouts
from pipeline.config import BiasTables, Head
from swin_common.errors import UserError

log = logging.getLogger(__name__)
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
REBUILT_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


class TransferError(UserError, ValueError):
    """Source weights that do not fit the model or the label layout they should start."""


@dataclass
class SourceModel:
    """Weights and label layout of the model to start from."""

    state: dict[str, torch.Tensor]
    synsets: list[str]
    description: str  # where it came from, for logs and run params
    meta: dict = field(default_factory=dict)
    weights_sha256: str = ""  # of the safetensors file it was read from (an export, a pulled version)


@dataclass
class TransferReport:
    resized_tables: list[str]
    head_rows_mapped: int
    fresh_synsets: list[str]  # target synsets absent from the source layout: freshly initialised rows

    def as_params(self) -> dict:
        return {
            "init_resized_bias_tables": len(self.resized_tables),
            "init_head_rows_mapped": self.head_rows_mapped,
            "init_fresh_synsets": ",".join(self.fresh_synsets) or "none",
        }


def resize_bias_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """A ((2M-1)^2, heads) table resized to (size^2, heads), bicubic over each head's (2M-1)x(2M-1) grid: timm's
    `resize_rel_pos_bias_table_simple` (the same computation as the official code), computed in fp32 and returned
    as a new tensor in the table's dtype."""

    rows, heads = table.shape
    side = round(rows**0.5)
    if side * side != rows:
        raise TransferError(f"a bias table of {rows} rows is not a square grid")
    if size % 2 == 0:
        raise TransferError(f"a bias table side is 2M-1 for window M, so odd; got {size}")
    resized = resize_rel_pos_bias_table_simple(table.float(), ((size + 1) // 2,) * 2, (size * size, heads))
    return resized.to(table.dtype).clone().contiguous()


def transfer_state(
    model: torch.nn.Module,
    source: SourceModel,
    target_synsets: list[str],
    bias_tables: BiasTables = "bicubic",
    head: Head = "map",
) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """The state dict to load into `model` (built at the target size/window/classes) from the source."""
    if bias_tables not in typing.get_args(BiasTables):
        raise ValueError(
            f"transfer.bias_tables must be one of {', '.join(typing.get_args(BiasTables))}, not {bias_tables!r}"
        )
    if head not in typing.get_args(Head):
        raise ValueError(f"transfer.head must be one of {', '.join(typing.get_args(Head))}, not {head!r}")
    target = model.state_dict()
    src = {k: v for k, v in source.state.items() if not k.endswith(REBUILT_BUFFERS)}
    extra = sorted(set(src) - set(target))
    missing = sorted(set(target) - set(src))
    if extra or missing:
        raise TransferError(
            f"{source.description} does not fit this architecture: "
            + (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "")
        )
    out, resized = {}, []
    for key, want in target.items():
        have = src[key]
        if key in HEAD_KEYS:
            continue
        if key.endswith("relative_position_bias_table"):
            if have.shape[1] != want.shape[1]:
                raise TransferError(f"{key}: {have.shape[1]} heads in the source, {want.shape[1]} in this model")
            if bias_tables == "zeros":
                out[key] = torch.zeros_like(want)
            else:
                out[key] = resize_bias_table(have, round(want.shape[0] ** 0.5)).to(want.dtype)
            if have.shape != want.shape or bias_tables == "zeros":
                resized.append(key)
            continue
        if have.shape != want.shape:
            raise TransferError(f"{key}: shape {tuple(have.shape)} in the source, {tuple(want.shape)} in this model")
        out[key] = have.to(want.dtype)
    out_head, mapped, fresh = map_head(target, src, source.synsets, target_synsets, head)
    out.update(out_head)
    return out, TransferReport(resized, mapped, fresh)


def map_head(target: dict, src: dict, source_synsets: list[str], target_synsets: list[str], head: str):
    weight, bias = (target[k].clone() for k in HEAD_KEYS)  # the model's fresh initialisation
    if head == "fresh":
        return dict(zip(HEAD_KEYS, (weight, bias), strict=True)), 0, list(target_synsets)
    src_weight, src_bias = (src[k] for k in HEAD_KEYS)
    if src_weight.shape[0] != len(source_synsets):
        raise TransferError(
            f"head.fc.weight has {src_weight.shape[0]} rows but the source layout {len(source_synsets)} synsets"
        )
    if weight.shape[0] != len(target_synsets):
        raise TransferError(f"this model has {weight.shape[0]} classes but the target layout {len(target_synsets)}")
    if src_weight.shape[1] != weight.shape[1]:
        raise TransferError(f"head.fc.weight: {src_weight.shape[1]} features in the source, {weight.shape[1]} here")
    index, fresh = map_layouts(source_synsets, target_synsets)
    rows = torch.tensor(index)
    have = rows >= 0
    weight[have] = src_weight[rows[have]].to(weight.dtype)
    bias[have] = src_bias[rows[have]].to(bias.dtype)
    return {HEAD_KEYS[0]: weight, HEAD_KEYS[1]: bias}, int(have.sum()), fresh


def initialise(
    model: torch.nn.Module,
    source: SourceModel,
    target_synsets: list[str],
    bias_tables: BiasTables = "bicubic",
    head: Head = "map",
) -> TransferReport:
    state, report = transfer_state(model, source, target_synsets, bias_tables, head)
    model.load_state_dict(state, strict=True)
    log.info(
        "initialised from %s: %d bias tables %s, %d head rows mapped by synset, %d fresh%s",
        source.description,
        len(report.resized_tables),
        "resized (bicubic)" if bias_tables == "bicubic" else "zeroed",
        report.head_rows_mapped,
        len(report.fresh_synsets),
        f" ({', '.join(report.fresh_synsets[:20])}{' ...' if len(report.fresh_synsets) > 20 else ''})"
        if report.fresh_synsets
        else "",
    )
    return report
