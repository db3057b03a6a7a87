"""Released Swin weights (Microsoft's .pth files, timm names and folders, Hugging Face transformers folders) read into
this project's timm layout, with the architecture, image size and window read from the weights themselves.

Invariant: what `read_released` returns loads strict into `create_model(arch, img_size, window_size, num_classes)`
and holds every weight of the source, renamed and fused, nothing dropped but the buffers the model rebuilds, so it
gives the source framework's own logits. Anything else (an unknown or missing key, a shape that fits no Swin, a
pickle that needs more than tensors) is a ReleasedWeightsError naming the file and the key: never a partial load.

The layouts (docs: research notes "released weights", sections 1-3):
- Microsoft's release files: a dict holding `model` (read with `torch.load(weights_only=True)`; nothing in the file
  is executed). Each stage's patch merging at the end of that stage (`layers.{0,1,2}.downsample`), `head.*`, and
  persistent `relative_position_index` and `attn_mask` buffers. timm's own `checkpoint_filter_fn` converts them,
  against a model built at the architecture, window and image size read from the weights (so nothing is resized).
- timm (>= 0.9): this project's layout. A `timm:NAME` is timm's own pretrained loading (the user's Hugging Face
  cache, or a given file); a folder is timm's `save_for_hf` output (config.json + weights), read directly.
- transformers: `swin.` / `classifier.` names, query/key/value apart (fused back into `qkv`, q-k-v on dim 0) and the
  patch merging at the end of each stage; both the older names (`attention.self.query`, `intermediate.dense`, ...),
  which transformers 5 still writes and reads, and the current ones (`attention.q_proj`, `mlp.fc1`, ...).
- Architecture: embed dim (patch_embed.proj.weight rows), blocks per stage and heads (bias table columns) against
  each variant's own built shapes; window from the bias tables' (2w-1)^2 rows; image size from Microsoft's
  attn_mask shapes, transformers' or timm's config, else the released convention (the last stage is one window:
  32 x window, so 224 at window 7, 384 at window 12). The description says which.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from pipeline.model.swin import VARIANTS, ArchError, create_model
from pipeline.model.transfer import REBUILT_BUFFERS
from swin_common.errors import UserError
from swin_common.released_kind import TIMM_PREFIX, folder_config, released_kind, timm_weights_file
from swin_common.safe_weights import check_safetensors

__all__ = ["ReleasedModel", "ReleasedWeightsError", "read_released", "released_kind"]

log = logging.getLogger(__name__)

ACCEPTED = (
    "a Microsoft release file (.pth), timm:NAME (e.g. timm:swin_base_patch4_window7_224.ms_in22k), a folder timm "
    "wrote (config.json with an architecture, model.safetensors) or one transformers wrote (config.json with "
    "model_type swin, model.safetensors or pytorch_model.bin)"
)
MS_BUFFERS = ("relative_position_index", "attn_mask")  # persistent in Microsoft's model, dropped by timm's filter
BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
MASK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn_mask$")
TABLE = "attn.relative_position_bias_table"

# transformers -> timm. Block parts: each generation's module name -> timm's (weight and bias alike)
HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",  # older names (what transformers 5 still writes)
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.o_proj": "attn.proj",  # current names (the model's own state_dict in transformers 5)
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
HF_QKV = {  # query, key, value: rows 0, 1, 2 of timm's fused qkv
    "attention.self.query": 0,
    "attention.self.key": 1,
    "attention.self.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
HF_TABLES = (
    "attention.self.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table",
)
HF_INDEXES = ("attention.self.relative_position_index", "attention.relative_position_bias.relative_position_index")
HF_TOP = {
    "swin.embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "swin.embeddings.norm.": "patch_embed.norm.",
    "swin.layernorm.": "norm.",
    "classifier.": "head.fc.",
}
HF_BLOCK_KEY = re.compile(r"^swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
HF_MERGE_KEY = re.compile(r"^swin\.encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")
# what a transformers config must say for timm's Swin to compute the same function (transformers' defaults)
HF_SAME_FUNCTION = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "use_absolute_embeddings": False,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "patch_size": 4,
    "num_channels": 3,
}


class ReleasedWeightsError(UserError, ValueError):
    """Released weights that cannot be read as a Swin here: names the file or key and what to do."""


@dataclass
class ReleasedModel:
    """Released weights in timm's layout and what they are, read from the weights themselves."""

    state: dict[str, torch.Tensor]  # timm >= 0.9 layout, fp32, contiguous, no rebuilt buffers; strict-loads
    arch: str  # a key of pipeline.model.VARIANTS
    img_size: int
    window_size: int
    num_classes: int  # rows of head.fc.weight
    source_format: str  # "microsoft" | "timm" | "transformers"
    description: str  # for logs and init.json: the kind, the absolute path or name, where the image size came from
    label_names: list[str] | None  # what the source says its rows are (id2label values, timm's label_names)
    name_hint: str  # the file name, timm's name.tag, transformers' _name_or_path; "" if nothing


@dataclass(frozen=True)
class _Shape:
    arch: str
    window: int
    num_classes: int


def read_released(source: str | Path, *, file: str | Path | None = None) -> ReleasedModel:
    """Reads any released Swin (released_kind's kinds) into the timm layout; `file` is the weights file for a
    timm:NAME (timm's pretrained_cfg_overlay=dict(file=...)). Raises ReleasedWeightsError naming the file or key."""
    kind = released_kind(source)
    is_name = isinstance(source, str) and source.startswith(TIMM_PREFIX)
    if file is not None and not is_name:
        raise ReleasedWeightsError(f"file={file} goes with a timm:NAME source only (the source is {source})")
    if kind == "timm" and is_name:
        return _read_timm_name(str(source)[len(TIMM_PREFIX) :], file)
    path = Path(source).absolute()
    if kind == "microsoft":
        return _read_microsoft(path)
    if kind == "timm":
        return _read_timm_folder(path)
    if kind == "transformers":
        return _read_transformers(path)
    what = "no such file or folder" if not path.exists() else "not a released Swin"
    raise ReleasedWeightsError(f"{path}: {what}; give {ACCEPTED}")


# --- the kinds ---------------------------------------------------------------------------------------------------


def _read_microsoft(path: Path) -> ReleasedModel:
    state = _state_dict(_torch_load(path), path)
    layout = _layout(state)
    origin: dict[str, str] = {}
    if layout == "transformers":
        state, origin = _from_transformers(state, str(path))
    what = {
        "microsoft": "Microsoft release file",
        "timm": "PyTorch weights file in timm's layout",
        "transformers": "PyTorch weights file in transformers' layout",
    }[layout]
    return _finish(
        state,
        layout,
        where=str(path),
        description=f"{what} {path}",
        source_format="microsoft",
        name_hint=path.name,
        origin=origin,
    )


def _read_timm_folder(folder: Path) -> ReleasedModel:
    config = folder_config(folder) or {}
    weights = timm_weights_file(folder)
    assert weights is not None  # released_kind says "timm" for a folder only with one
    state = _load_weights(weights)
    pretrained = config.get("pretrained_cfg") or {}
    img_size, size_from = None, ""
    input_size = pretrained.get("input_size")
    if isinstance(input_size, list) and len(input_size) == 3:
        img_size, size_from = _square(input_size[1:], folder / "config.json", "pretrained_cfg.input_size")
    tag = pretrained.get("tag")
    name_hint = f"{config['architecture']}.{tag}" if tag else str(config["architecture"])
    return _finish(
        state,
        _layout(state),
        where=str(weights),
        description=f"timm folder {folder} ({weights.name})",
        source_format="timm",
        name_hint=name_hint,
        img_size=img_size,
        size_from=size_from,
        label_names=_label_list(config.get("label_names"), folder / "config.json", "label_names"),
    )


def _read_timm_name(name: str, file: str | Path | None) -> ReleasedModel:
    where = f"{TIMM_PREFIX}{name}"
    kwargs: dict = {}
    if file is not None:
        file = Path(file).absolute()
        if not file.is_file():
            raise ReleasedWeightsError(f"{where}: file={file}: no such file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
        where += f" (file={file})"
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise ReleasedWeightsError(f"{where}: {_refused(e)}; nothing from it was executed") from None
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # unknown name, not cached offline, head mismatch
        source = (
            "the weights file does not fit this name (its classes and layout)"
            if file is not None
            else "timm reads the weights from your Hugging Face cache (HF_HUB_OFFLINE=1 reads only the cache: "
            "run timm.create_model(NAME, pretrained=True) once where the Hub is reachable) or give its file"
        )
        raise ReleasedWeightsError(f"{where}: timm could not load it ({_first_line(e)}); {source}") from None
    if not isinstance(model, SwinTransformer):
        raise ReleasedWeightsError(f"{where} is timm's {type(model).__name__}, not a Swin Transformer (v1)")
    cfg: dict = getattr(model, "pretrained_cfg", {})  # set by timm's builder, untyped
    name_hint = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg.get("architecture", name)
    patch_embed: Any = model.patch_embed  # timm's PatchEmbed, typed by torch as Tensor | Module
    img_size = int(patch_embed.img_size[0])
    return _finish(
        model.state_dict(),
        "timm",
        where=where,
        description=f"timm {where}",
        source_format="timm",
        name_hint=name_hint,
        img_size=img_size,
        size_from=f"image size {img_size} from timm's pretrained config",
        label_names=_label_list(cfg.get("label_names"), Path(where), "pretrained_cfg.label_names"),
    )


def _read_transformers(folder: Path) -> ReleasedModel:
    config_path = folder / "config.json"
    config = folder_config(folder) or {}
    for key, want in HF_SAME_FUNCTION.items():
        if config.get(key, want) != want:
            raise ReleasedWeightsError(
                f"{config_path}: {key} is {config[key]!r} where timm's Swin has {want!r}: the weights would not "
                f"compute the same function here"
            )
    state, origin = _from_transformers(_transformers_weights(folder), str(folder))
    img_size, size_from = None, ""
    if "image_size" in config:
        img_size, size_from = _square(config["image_size"], config_path, "image_size")
    released = _finish(
        state,
        "transformers",
        where=str(folder),
        description=f"transformers folder {folder}",
        source_format="transformers",
        name_hint=str(config.get("_name_or_path") or ""),
        img_size=img_size,
        size_from=size_from,
        label_names=_id2label(config.get("id2label"), config_path),
        origin=origin,
    )
    if config.get("window_size", released.window_size) != released.window_size:
        raise ReleasedWeightsError(
            f"{config_path}: window_size is {config['window_size']} but the weights' bias tables are window "
            f"{released.window_size}'s: the folder's config and weights do not belong together"
        )
    return released


# --- reading files -----------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> object:
    """torch.load(weights_only=True): tensors and plain containers only, nothing executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ReleasedWeightsError(
            f"{path}: {_refused(e)}; nothing from it was executed. Only if you trust the file, keep its weights "
            f"alone and read that: python -c \"import torch; torch.save({{'model': torch.load('{path}', "
            f"weights_only=False)['model']}}, 'weights_only.pth')\""
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ReleasedWeightsError(f"{path} is not a readable PyTorch weights file ({_first_line(e)})") from None


def _refused(error: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f"it needs {found.group(1)}" if found else _first_line(error)
    return f"refused: unpickling it needs more than tensors ({what})"


def _state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded pickle: its `model` (Microsoft's files) or `state_dict`, or the dict itself."""
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise ReleasedWeightsError(
            f"{path} holds {type(loaded).__name__}, not weights: Microsoft's release files are a dict holding "
            f"'model' (a state dict)"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ReleasedWeightsError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor")
    return loaded


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return load_file(path)
    return _state_dict(_torch_load(path), path)


def _transformers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its shards (model.safetensors.index.json) or pytorch_model.bin (weights_only)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_weights(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ReleasedWeightsError(f"{index}: not a weights index ({e})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_weights(folder / shard))
            return state
    raise ReleasedWeightsError(f"{folder}: no model.safetensors or pytorch_model.bin beside its config.json")


def _square(size: object, path: Path, key: str) -> tuple[int, str]:
    sides = [size, size] if isinstance(size, int) else size
    if not isinstance(sides, list | tuple) or len(sides) != 2 or sides[0] != sides[1] or not isinstance(sides[0], int):
        raise ReleasedWeightsError(f"{path}: {key} {size!r} is not a square image size")
    return sides[0], f"image size {sides[0]} from {path.name} {key}"


def _label_list(names: object, path: Path, key: str) -> list[str] | None:
    """A label list (or a {row: name} dict covering every row) as names in row order, else None."""
    if isinstance(names, dict):
        try:
            rows = {int(k): str(v) for k, v in names.items()}
        except ValueError:
            raise ReleasedWeightsError(f"{path}: {key} has a key that is not a row number") from None
        if sorted(rows) != list(range(len(rows))):
            raise ReleasedWeightsError(f"{path}: {key} does not name rows 0..{len(rows) - 1} once each")
        return [rows[i] for i in range(len(rows))]
    if isinstance(names, list | tuple) and names:
        return [str(n) for n in names]
    return None


def _id2label(id2label: object, path: Path) -> list[str] | None:
    """transformers' id2label as names in row order; None for its placeholders (LABEL_0, LABEL_1, ...)."""
    names = _label_list(id2label, path, "id2label")
    if names is None or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


# --- layouts -----------------------------------------------------------------------------------------------------


def _layout(state: dict[str, torch.Tensor]) -> str:
    """Which naming a state dict follows, from its keys."""
    if any(k.startswith(("swin.", "classifier.")) for k in state):
        return "transformers"
    if (
        "layers.0.downsample.reduction.weight" in state
        or "head.weight" in state
        or any(k.endswith(MS_BUFFERS) for k in state)
    ):
        return "microsoft"
    return "timm"


def _ms_to_timm(key: str) -> str:
    """Microsoft's name -> timm's: patch merging to the start of the next stage, `head.` -> `head.fc.` (the renames
    timm's checkpoint_filter_fn does)."""
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
    return "head.fc." + key[len("head.") :] if key.startswith("head.") else key


def _timm_to_ms(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
    return "head." + key[len("head.fc.") :] if key.startswith("head.fc.") else key


def _from_transformers(state: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """transformers' names (both generations) -> timm's, with query/key/value fused into qkv; also returns each timm
    key's source key. Raises ReleasedWeightsError naming unknown, twice-given or incomplete keys."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    qkv: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []

    def put(name: str, key: str, value: torch.Tensor) -> None:
        if name in out:
            raise ReleasedWeightsError(f"{where}: {key} and {origin[name]} are the same weight ({name}) given twice")
        out[name], origin[name] = value, key

    for key, value in state.items():
        block = HF_BLOCK_KEY.match(key)
        merge = HF_MERGE_KEY.match(key)
        top = next((p for p in HF_TOP if key.startswith(p) and key[len(p) :] in ("weight", "bias")), None)
        if block:
            stage, index, rest = block.groups()
            prefix = f"layers.{stage}.blocks.{index}."
            module, _, leaf = rest.rpartition(".")
            if rest in HF_INDEXES:
                continue  # rebuilt by the model
            if rest in HF_TABLES:
                put(prefix + TABLE, key, value)
            elif leaf in ("weight", "bias") and module in HF_QKV:
                part = qkv.setdefault(f"{prefix}attn.qkv.{leaf}", {})
                if HF_QKV[module] in part:
                    raise ReleasedWeightsError(f"{where}: {key} and {part[HF_QKV[module]][0]} are the same weight")
                part[HF_QKV[module]] = (key, value)
            elif leaf in ("weight", "bias") and module in HF_BLOCK:
                put(f"{prefix}{HF_BLOCK[module]}.{leaf}", key, value)
            else:
                unknown.append(key)
        elif merge:
            put(f"layers.{int(merge.group(1)) + 1}.downsample.{merge.group(2)}", key, value)
        elif top:
            put(HF_TOP[top] + key[len(top) :], key, value)
        else:
            unknown.append(key)
    if unknown:
        raise ReleasedWeightsError(
            f"{where}: {_names(unknown, 'unknown key')}: not a SwinForImageClassification's weights (an absolute "
            f"position embedding, another model's head?); nothing was loaded"
        )
    for name, parts in qkv.items():
        if len(parts) < 3:
            missing = [_hf_name(name, part) for part in range(3) if part not in parts]
            raise ReleasedWeightsError(f"{where}: {_names(missing, 'missing key')} (beside {parts[min(parts)][0]})")
        put(name, parts[0][0], torch.cat([parts[i][1] for i in range(3)], 0))
    return out, origin


def _hf_name(key: str, qkv_part: int = 0) -> str:
    """timm's name -> transformers' (the older names, which transformers 5 still writes), for messages."""
    block = BLOCK_KEY.match(key)
    if block:
        rest = key[block.end() :]
        module, _, leaf = rest.rpartition(".")
        prefix = f"swin.encoder.layers.{block.group(1)}.blocks.{block.group(2)}."
        if rest == TABLE:
            return prefix + HF_TABLES[0]
        if module == "attn.qkv":
            return f"{prefix}{list(HF_QKV)[qkv_part]}.{leaf}"
        old = next((hf for hf, timm_name in HF_BLOCK.items() if timm_name == module), module)
        return f"{prefix}{old}.{leaf}"
    merge = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", key)
    if merge:
        return f"swin.encoder.layers.{int(merge.group(1)) - 1}.downsample.{merge.group(2)}"
    top = next((hf for hf, timm_prefix in HF_TOP.items() if key.startswith(timm_prefix)), None)
    return top + key[len(HF_TOP[top]) :] if top else key


# --- the shape, the checks and the state ------------------------------------------------------------------------


def _finish(
    state: dict[str, torch.Tensor],
    layout: str,
    *,
    where: str,
    description: str,
    source_format: str,
    name_hint: str,
    img_size: int | None = None,
    size_from: str = "",
    label_names: list[str] | None = None,
    origin: dict[str, str] | None = None,
) -> ReleasedModel:
    """Infers the shape, builds the model, checks every key and shape, converts and loads strict: the result."""
    source_name: Callable[[str], str] = {
        "microsoft": _timm_to_ms,
        "transformers": lambda k: (origin or {}).get(k) or _hf_name(k),
    }.get(layout, lambda k: k)
    shape = _infer_shape(state, where, source_name)
    if img_size is None:
        found = _size_from_masks(state, shape.window, where)
        img_size, size_from = found or (
            32 * shape.window,
            f"image size {32 * shape.window} by the released convention (the last stage is one window)",
        )
    if label_names is not None and len(label_names) != shape.num_classes:
        raise ReleasedWeightsError(
            f"{where}: its labels name {len(label_names)} classes, its head has {shape.num_classes} rows"
        )
    try:
        with torch.device("meta"):  # the shapes and buffers to check against, without initialising weights
            model = create_model(shape.arch, img_size, shape.window, shape.num_classes, fused_attn=False)
    except ArchError as e:  # an image size from the masks or a config that no Swin here builds
        raise ReleasedWeightsError(f"{where}: {size_from}: {e}") from None
    expected = model.state_dict()
    if layout == "microsoft":
        _check_ms_buffers(state, model, where, img_size, shape.window)
        weights = {k: v for k, v in state.items() if not k.endswith(MS_BUFFERS)}
        _check_keys({_ms_to_timm(k): v for k, v in weights.items()}, expected, where, shape, source_name)
        state = checkpoint_filter_fn(weights, model)  # timm's own conversion; nothing to resize after the check
    else:
        state = {k: v for k, v in state.items() if not k.endswith(REBUILT_BUFFERS)}
        _check_keys(state, expected, where, shape, source_name)
    state = {k: state[k].float().contiguous() for k in expected}
    try:
        model.load_state_dict(state, strict=True, assign=True)  # the final check: every key, every shape
    except RuntimeError as e:  # the checks above should have said it; never a partial load
        raise ReleasedWeightsError(f"{where}: does not load into {shape.arch}: {_first_line(e)}") from None
    description = f"{description}; {shape.arch} at {img_size}/window {shape.window}, {size_from}"
    log.info("read %s", description)
    return ReleasedModel(
        state=state,
        arch=shape.arch,
        img_size=img_size,
        window_size=shape.window,
        num_classes=shape.num_classes,
        source_format=source_format,
        description=description,
        label_names=label_names,
        name_hint=name_hint,
    )


@functools.cache
def _variant_shapes() -> dict[tuple[int, tuple[int, ...], tuple[int, ...]], str]:
    """(embed dim, blocks per stage, heads per stage) of each variant, from the model timm builds (on meta)."""
    shapes = {}
    with torch.device("meta"):
        for arch in VARIANTS:
            model: Any = create_model(arch, 224, 7, 1, fused_attn=False)  # timm's SwinTransformer
            depths = tuple(len(stage.blocks) for stage in model.layers)
            heads = tuple(stage.blocks[0].attn.num_heads for stage in model.layers)
            shapes[(model.embed_dim, depths, heads)] = arch
    return shapes


def _infer_shape(state: dict[str, torch.Tensor], where: str, source_name: Callable[[str], str]) -> _Shape:
    """Variant, window and classes from the weights (Microsoft's or timm's names: the same for these keys)."""
    patch = state.get("patch_embed.proj.weight")
    if patch is None or patch.ndim != 4:
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise ReleasedWeightsError(
            f"{where}: no {source_name('patch_embed.proj.weight')} (a Swin's patch embedding): not Swin weights "
            f"(it holds {len(state)} tensors: {sample} ...)"
        )
    blocks: dict[int, set[int]] = {}
    for key in state:
        if found := BLOCK_KEY.match(key):
            blocks.setdefault(int(found.group(1)), set()).add(int(found.group(2)))
    if sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise ReleasedWeightsError(f"{where}: stages {sorted(blocks)} (layers.N.blocks): a Swin has stages 0, 1, ...")
    depths = tuple(max(blocks[stage]) + 1 for stage in sorted(blocks))
    heads = []
    for stage in sorted(blocks):
        key = f"layers.{stage}.blocks.0.{TABLE}"
        table = state.get(key)
        if table is None or table.ndim != 2:
            raise ReleasedWeightsError(f"{where}: missing {source_name(key)} (its shape gives the heads)")
        heads.append(table.shape[1])
    key = f"layers.0.blocks.0.{TABLE}"
    rows = state[key].shape[0]
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ReleasedWeightsError(f"{where}: {source_name(key)} has {rows} rows, not (2w-1)^2 for a window w")
    head = state.get("head.fc.weight", state.get("head.weight"))
    if head is None or head.ndim != 2:
        raise ReleasedWeightsError(f"{where}: missing {source_name('head.fc.weight')} (the classifier)")
    signature = (patch.shape[0], depths, tuple(heads))
    arch = _variant_shapes().get(signature)
    if arch is None:
        known = "; ".join(f"{a}: {e}, {list(d)}, {list(h)}" for (e, d, h), a in _variant_shapes().items())
        raise ReleasedWeightsError(
            f"{where}: embed dim {signature[0]} ({source_name('patch_embed.proj.weight')} rows), depths "
            f"{list(depths)} and heads {heads} (the bias tables' columns) fit no Swin here ({known})"
        )
    return _Shape(arch, (side + 1) // 2, head.shape[0])


def _size_from_masks(state: dict[str, torch.Tensor], window: int, where: str) -> tuple[int, str] | None:
    """Image size from Microsoft's attn_mask buffers: stage s at image size H has (H / 4 / 2^s / window)^2 windows."""
    masks = sorted((int(m.group(1)), key) for key in state if (m := MASK_KEY.match(key)))
    if not masks:
        return None
    stage, key = masks[0]
    mask = state[key]
    side = math.isqrt(mask.shape[0]) if mask.ndim == 3 else 0
    if mask.ndim != 3 or side * side != mask.shape[0] or tuple(mask.shape[1:]) != (window * window,) * 2:
        raise ReleasedWeightsError(f"{where}: {key} has shape {list(mask.shape)}, not a window {window} Swin's mask")
    size = side * window * 4 * 2**stage
    return size, f"image size {size} from {key} ({mask.shape[0]} windows)"


def _check_ms_buffers(
    state: dict[str, torch.Tensor], model: torch.nn.Module, where: str, img_size: int, window: int
) -> None:
    """Microsoft's persistent buffers must be the ones the model rebuilds (same blocks, same shapes)."""
    for key, value in state.items():
        if not key.endswith(MS_BUFFERS):
            continue
        path, _, name = key.rpartition(".")
        try:
            built = getattr(model.get_submodule(path), name, None)
        except AttributeError:
            raise ReleasedWeightsError(f"{where}: unknown key {key}: no such block in this Swin") from None
        if built is None:
            raise ReleasedWeightsError(
                f"{where}: {key}: that block has no {name} at image size {img_size}/window {window} (the weights "
                f"are of another image size or window)"
            )
        if tuple(value.shape) != tuple(built.shape):
            raise ReleasedWeightsError(
                f"{where}: {key} has shape {list(value.shape)} where the model at image size {img_size}/window "
                f"{window} has {list(built.shape)}"
            )


def _check_keys(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    where: str,
    shape: _Shape,
    source_name: Callable[[str], str],
) -> None:
    """Every key of the model present once with its shape, no other key: else the keys, in the source's names."""
    model = f"{shape.arch} at window {shape.window} with {shape.num_classes} classes"
    unknown = [source_name(k) for k in state if k not in expected]
    missing = [source_name(k) for k in expected if k not in state]
    problems = [_names(unknown, "unknown key")] if unknown else []
    problems += [_names(missing, "missing key")] if missing else []
    problems += [
        f"{source_name(k)} has shape {list(v.shape)} where {model} has {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ][:3]
    problems += [
        f"{source_name(k)} is {v.dtype}, not floating point"
        for k, v in state.items()
        if k in expected and not v.is_floating_point()
    ][:3]
    if problems:
        raise ReleasedWeightsError(f"{where}: {'; '.join(problems)} (read as {model}); nothing was loaded")


def _names(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{what}{'s' if len(keys) > 1 else ''} {shown}{more}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
