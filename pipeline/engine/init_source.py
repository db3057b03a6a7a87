"""What `init_from` may name, told apart and checked from the files' headers alone, without torch: a complete
checkpoint folder (its COMPLETE marker), an exported model folder or its model.safetensors beside model.json, or a
released Swin (pipeline/model/released.py reads them): Microsoft's release file (.pth), a `timm:NAME` from the
user's Hugging Face cache, a timm folder (timm's config.json) or a transformers folder (config.json of model_type
swin). The pre-launch check (`python -m pipeline.train --check`, which the launch scripts run before any rank
starts) and `model_export.load_source` share it, so a path the check lets through is one the ranks can read, and
a path it refuses is refused in one line naming the file and what was found there.

Weights must be Swin weights: the safetensors header (read as JSON) or the names in a torch zip file's pickle (an
opcode walk: nothing unpickled) hold the patch embedding and at least one relative position bias table. Whether
they fit the run's architecture is the ranks' check (transfer.transfer_state), which needs the model built.
"""

from __future__ import annotations

import json
from pathlib import Path

from swin_common.errors import UserError
from swin_common.safe_weights import pickled_strings, tensor_shapes

ACCEPTED = (
    "a complete checkpoint folder (runs/NAME/checkpoints/step_N), an exported model folder (runs/NAME/model: "
    "model.safetensors + model.json) or its model.safetensors, models:/NAME@ALIAS, or a released Swin: Microsoft's "
    ".pth, timm:NAME, a timm or transformers folder"
)
SWIN_KEYS = ("patch_embed.proj.weight",)
SWIN_SUFFIX = "relative_position_bias_table"
TIMM_PREFIX = "timm:"  # init_from=timm:swin_base_patch4_window7_224.ms_in22k, from the Hugging Face cache
NAMED_PREFIXES = ("models:/", TIMM_PREFIX)  # values that name a model rather than a path
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".tar")  # torch.save files: read with torch.load(weights_only=True)
# the names that tell each released folder's weights apart (transformers keeps its own prefixes)
RELEASED_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
TRANSFORMERS_SWIN_KEY = "swin.embeddings.patch_embeddings.projection.weight"
RELEASED_KINDS = ("microsoft", "timm", "transformers")


class InitSourceError(UserError, ValueError):
    """An init_from that names nothing the run can start from: the path and what was found there."""


def init_source_kind(value: str | Path) -> tuple[str, Path]:
    """(kind, path) of an init_from value: "checkpoint" (its folder), "export" (its model.safetensors),
    "microsoft" (a release .pth), "timm" (a timm folder; a `timm:NAME` is Path(NAME)) or "transformers" (its
    folder); else InitSourceError naming the absolute path and what it holds."""
    if str(value).startswith(TIMM_PREFIX):
        name = str(value).removeprefix(TIMM_PREFIX)
        if not name.startswith("swin"):
            raise InitSourceError(
                f"init_from={value}: not a timm Swin (give e.g. timm:swin_base_patch4_window7_224.ms_in22k)"
            )
        return "timm", Path(name)
    path = Path(value)
    where = f"init_from={path.absolute()}"
    if not path.exists():
        raise InitSourceError(f"{where}: no such file or folder (give {ACCEPTED})")
    if path.is_dir():
        if (path / "COMPLETE").is_file():
            return "checkpoint", path
        if (path / "model.json").is_file():
            return "export", path / "model.safetensors"
        if (path / "config.json").is_file():
            return released_folder_kind(path), path
        found = sorted(p.name for p in path.iterdir())[:5]
        hint = (
            ": it is a run folder, start from its model/ or a checkpoint under checkpoints/"
            if (path / "checkpoints").is_dir()
            else ""
        )
        raise InitSourceError(
            f"{where} is a folder without COMPLETE, model.json or config.json (it holds "
            f"{', '.join(found) or 'nothing'}){hint}; give {ACCEPTED}"
        )
    if path.suffix == ".safetensors":
        return "export", path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "microsoft", path
    raise InitSourceError(
        f"{where} is a {path.suffix or 'file'} file, not weights this run can start from; give {ACCEPTED}"
    )


def released_folder_kind(folder: Path) -> str:
    """ "transformers" (config.json of model_type swin) or "timm" (timm's config.json: an architecture) for a
    folder of released weights; InitSourceError naming its config.json otherwise."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise InitSourceError(f"init_from: {config_path.absolute()} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        config = {}
    if config.get("model_type") == "swin":
        return "transformers"
    if str(config.get("architecture", "")).startswith("swin"):
        return "timm"
    said = config.get("model_type") or config.get("architecture") or "neither model_type nor architecture"
    raise InitSourceError(
        f"init_from: {config_path.absolute()} is not a Swin's config (it says {said}); a transformers folder says "
        f"model_type swin, a timm folder architecture swin_..."
    )


def released_weights_file(folder: Path) -> Path:
    """The weights file of a released folder (timm's and transformers' own order of preference)."""
    for name in RELEASED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InitSourceError(
        f"init_from={folder.absolute()}: no weights beside config.json (looked for {', '.join(RELEASED_WEIGHTS)})"
    )


def weight_names(path: Path) -> set[str] | None:
    """The tensor names of a weights file from its header or pickle opcodes (nothing unpickled); None when only
    loading can tell (a legacy, non-zip torch file)."""
    if path.suffix == ".safetensors":
        return set(tensor_shapes(path))
    return pickled_strings(path)


def check_swin_names(path: Path, names: set[str] | None, key: str) -> None:
    """InitSourceError unless the names hold `key` and a relative position bias table (None: loading decides)."""
    if names is None or (key in names and any(k.endswith(SWIN_SUFFIX) for k in names)):
        return
    sample = ", ".join(sorted(n for n in names if "." in n)[:3]) or "no tensor names"
    raise InitSourceError(
        f"init_from={path.absolute()} holds no Swin weights (no {key} and relative position bias tables; "
        f"it holds {sample} ...)"
    )


def check_init_source(value: str | Path) -> str:
    """Checks an init_from value from its headers (init_source_kind, then an export's model.json, the Swin names of
    the weights); returns what it is, for the log. Raises InitSourceError naming the file."""
    kind, found = init_source_kind(value)
    if kind == "checkpoint":
        if not (found / "synsets.txt").is_file():
            raise InitSourceError(f"init_from={found.absolute()}: a checkpoint without synsets.txt (its label layout)")
        return f"checkpoint {found}"
    if kind == "timm":
        return f"timm {found} (from the Hugging Face cache)"
    if kind == "microsoft":
        check_swin_names(found, weight_names(found), SWIN_KEYS[0])
        return f"released weights {found}"
    if kind in ("transformers", "timm"):
        weights = released_weights_file(found)
        key = TRANSFORMERS_SWIN_KEY if kind == "transformers" else SWIN_KEYS[0]
        check_swin_names(weights, weight_names(weights), key)
        return f"{kind} folder {found}"
    where = f"init_from={found.absolute()}"
    meta_path = found.with_name("model.json")
    if not found.is_file():
        raise InitSourceError(f"{where}: no such file (an export holds model.safetensors beside model.json)")
    if not meta_path.is_file():
        raise InitSourceError(f"{where}: no model.json beside it (its label layout is needed to map the head)")
    try:
        synsets = json.loads(meta_path.read_text())["synsets"]
    except (ValueError, KeyError, TypeError) as e:
        raise InitSourceError(f"init_from: {meta_path.absolute()} is not an export's model.json ({e})") from None
    check_swin_names(found, set(tensor_shapes(found)), SWIN_KEYS[0])  # refuses a pickle named .safetensors
    return f"exported model {found.parent} ({len(synsets)} classes)"
