"""Export: a checkpoint consolidated into a plain timm model, the contract the registry and fine-tuning read.

`<out>/model.safetensors` holds the fp32 weights (ZeRO 1-3 partitions merged by DeepSpeed's own
`zero_to_fp32`; a ZeRO-0 checkpoint already holds the whole module); `<out>/model.json` says how to rebuild and
feed the model: timm architecture and kwargs, image size, window, label layout (synsets) and preprocessing;
`<out>/config.json` says the same to timm itself, written by timm's own config writer, so that
`timm.create_model("local-dir:<out>", pretrained=True)` loads the folder without this project.
Loading needs no unpickling: `load_exported(dir)` returns a ready timm model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import RunConfig, load_config
from pipeline.data.samples import MEAN, STD
from pipeline.engine.checkpoint import verify_checkpoint
from pipeline.engine.init_source import RELEASED_KINDS, check_init_source, init_source_kind
from pipeline.model import create_model, timm_kwargs, timm_name
from pipeline.model.head_layouts import HeadLayout, head_layout, readable_names
from pipeline.model.released import ReleasedModel, read_released
from pipeline.model.transfer import SourceModel
from swin_common.errors import UserError
from swin_common.safe_weights import UnsafeModelFile, check_safetensors, file_sha256  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
FORMAT = "swin-pipeline-model/1"


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint folder written by pipeline.engine.checkpoint, checked before it is read."""
    verify_checkpoint(checkpoint)  # CheckpointDamaged (one line, exit 2) naming the file and what is wrong
    meta = json.loads((checkpoint / "COMPLETE").read_text())
    if meta["zero_stage"] == 0:
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def model_metadata(cfg: RunConfig, synsets: list[str]) -> dict:
    """model.json of a model trained with `cfg` on the label layout `synsets`."""
    m = cfg.model
    return export_metadata(m.arch, m.img_size, m.window_size, synsets, cfg.data.crop_pct)


def export_metadata(arch: str, img_size: int, window_size: int, synsets: list[str], crop_pct: float) -> dict:
    """model.json: how to rebuild the model (timm architecture and kwargs, size, window), its label layout and the
    preprocessing it was evaluated with; `label_descriptions` holds WordNet's words for each synset it knows."""
    return {
        "format": FORMAT,
        "arch": arch,
        "timm_name": timm_name(arch, img_size, window_size),
        "timm_kwargs": {
            k: v for k, v in timm_kwargs(arch, img_size, window_size, len(synsets)).items() if k != "drop_path_rate"
        },
        "img_size": img_size,
        "window_size": window_size,
        "num_classes": len(synsets),
        "synsets": synsets,
        "label_descriptions": readable_names(synsets),
        "preprocessing": {
            "mean": list(MEAN),
            "std": list(STD),
            "crop_pct": crop_pct,
            "interpolation": "bicubic",
            "input_size": [3, img_size, img_size],
        },
    }


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """<out> (replaced whole, at the end) from the checkpoint folder; <out>.tmp while it is under way."""
    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint / "config.yaml")
    synsets = (checkpoint / "synsets.txt").read_text().split()
    meta = model_metadata(cfg, synsets)
    meta["source_checkpoint"] = str(checkpoint.resolve())
    meta["step"] = json.loads((checkpoint / "COMPLETE").read_text())["step"]
    return write_export(consolidated_state_dict(checkpoint), meta, out)


def write_export(state: dict[str, torch.Tensor], meta: dict, out: str | Path) -> Path:
    """The export folder <out> (model.safetensors, model.json, timm's config.json), replaced whole at the end;
    <out>.tmp while it is under way. The weights must load strictly into the model `meta` describes."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # what an interrupted export left
    tmp.mkdir(parents=True)
    model = create_model(meta["arch"], meta["img_size"], meta["window_size"], meta["num_classes"])
    model.load_state_dict(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    write_timm_config(model, tmp, meta)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# what the base architecture's pretrained_cfg says of timm's released weights (their tag, licence, paper, source):
# untrue of weights this project trained, so never copied into an export's config.json
RELEASED_WEIGHTS_KEYS = (
    "tag",
    "license",
    "description",
    "notes",
    "origin_url",
    "paper_ids",
    "paper_name",
    "url",
    "hf_hub_id",
    "hf_hub_filename",
    "hf_hub_revision",
    "file",
    "source",
)


def write_timm_config(model: torch.nn.Module, folder: Path, meta: dict) -> Path:
    """<folder>/config.json by timm's own writer (`save_config_for_hf`; never its pickle `pytorch_model.bin`):
    architecture = timm's registered base name with `model_args` for size, window and this project's variants,
    `num_classes`, `label_names` = the synsets, and a `pretrained_cfg` whose input size, crop_pct, interpolation,
    mean and std are the ones the model was evaluated with."""
    from timm.models._hub import save_config_for_hf  # save_for_hf minus the weights, which are written already

    pre = meta["preprocessing"]
    # timm sets pretrained_cfg (a dict) on every model it builds; torch's Module.__getattr__ stub says Tensor | Module
    released = cast(dict[str, Any], model.pretrained_cfg)
    # torch's Module.__setattr__ stub takes Tensor | Module only; any other value is a plain attribute at runtime
    model.pretrained_cfg = {k: v for k, v in released.items() if k not in RELEASED_WEIGHTS_KEYS}  # type: ignore[assignment]
    path = Path(folder) / "config.json"
    save_config_for_hf(
        model,
        str(path),
        model_config={
            "label_names": list(meta["synsets"]),
            # timm's form: synset -> words, for the synsets WordNet names
            "label_descriptions": {
                s: d for s, d in zip(meta["synsets"], meta.get("label_descriptions") or [], strict=False) if d
            },
        },
        data_config={
            "input_size": tuple(pre["input_size"]),
            "crop_pct": pre["crop_pct"],
            "interpolation": pre["interpolation"],
            "mean": tuple(pre["mean"]),
            "std": tuple(pre["std"]),
            "crop_mode": "center",
        },
    )
    return path


def exported_from(out: Path, checkpoint: Path) -> bool:
    """Whether <out> is a complete export of this checkpoint folder, made after it was saved."""
    try:
        source = json.loads((out / "model.json").read_text())["source_checkpoint"]
        return (
            Path(source) == checkpoint.resolve()
            and (out / "model.json").stat().st_mtime >= (checkpoint / "COMPLETE").stat().st_mtime
        )
    except (OSError, ValueError, KeyError):
        return False


class NotAnExport(UserError, ValueError):
    """A folder whose model.json is not this project's export."""


def load_exported(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """(timm model in eval mode, its metadata) from an exported folder."""
    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise NotAnExport(f"{folder}/model.json is not a {FORMAT} export")
    weights = folder / "model.safetensors"
    check_safetensors(weights)
    model = create_model(meta["arch"], meta["img_size"], meta["window_size"], meta["num_classes"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), meta


def load_source(path: str | Path) -> SourceModel:
    """The weights and label layout to initialise from (`init_from`): a complete checkpoint folder, an exported
    model folder or its model.safetensors beside model.json, or a released Swin (told apart by init_source, as the
    pre-launch check does). (A models:/ URI is pulled to a folder first, by `python -m pipeline.train`.)"""

    check_init_source(path)  # the same refusals as the pre-launch check, from the headers, before any load
    kind, found = init_source_kind(path)
    if kind == "checkpoint":
        return SourceModel(
            consolidated_state_dict(found), (found / "synsets.txt").read_text().split(), f"checkpoint {found}"
        )
    if kind in RELEASED_KINDS:
        released, layout = read_released_with_layout(str(path))
        return SourceModel(
            released.state,
            layout.synsets,
            released.description,
            {"source_format": released.source_format, "head_layout": layout.name, "head_layout_why": layout.why},
            file_sha256(path) if Path(path).is_file() else "",
        )
    meta = json.loads(found.with_name("model.json").read_text())
    return SourceModel(
        load_file(str(found)), meta["synsets"], f"exported model {found.parent}", meta, file_sha256(found)
    )


def read_released_with_layout(
    source: str, labels_file: str | Path | None = None, file: str | Path | None = None
) -> tuple[ReleasedModel, HeadLayout]:
    """A released Swin in timm's layout and the synset of each of its head rows (head_layouts decides, once)."""
    released = read_released(source, file=file)
    layout = head_layout(
        released.num_classes, declared=released.label_names, labels_file=labels_file, origin=released.description
    )
    log.info("%s: head of %d rows read as %s (%s)", released.description, released.num_classes, layout.name, layout.why)
    return released, layout


# eval crop of a released model: the official protocol (resize to 256, centre 224) at 224; the whole image at 384
RELEASED_CROP_PCT = {224: 0.875, 384: 1.0}


def import_released(
    source: str, out: str | Path, labels_file: str | Path | None = None, file: str | Path | None = None
) -> Path:
    """The export folder <out> of a released Swin (pipeline.import_model): its weights in timm's layout, model.json
    with the synsets of its head rows and where they came from."""
    released, layout = read_released_with_layout(source, labels_file, file)
    crop_pct = RELEASED_CROP_PCT.get(released.img_size, 1.0)
    meta = export_metadata(released.arch, released.img_size, released.window_size, layout.synsets, crop_pct)
    weights = Path(file or source)
    meta["source"] = {
        "format": released.source_format,
        "description": released.description,
        "name": released.name_hint,
        "weights_sha256": file_sha256(weights) if weights.is_file() else None,
        "head_layout": layout.name,
        "head_layout_why": layout.why,
    }
    return write_export(released.state, meta, out)
