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
from swin_common.released_kind import TIMM_PREFIX, TIMM_WEIGHTS, folder_config, released_kind, timm_weights_file
from swin_common.safe_weights import pickled_strings, tensor_shapes

ACCEPTED = (
    "a complete checkpoint folder (runs/NAME/checkpoints/step_N), an exported model folder (runs/NAME/model: "
    "model.safetensors + model.json) or its model.safetensors, models:/NAME@ALIAS, or a released Swin: Microsoft's "
    ".pth, timm:NAME, a timm or transformers folder"
)
SWIN_KEYS = ("patch_embed.proj.weight",)
SWIN_SUFFIX = "relative_position_bias_table"
NAMED_PREFIXES = ("models:/", TIMM_PREFIX)  # values that name a model rather than a path (timm:NAME: HF cache)
TRANSFORMERS_SWIN_KEY = "swin.embeddings.patch_embeddings.projection.weight"
RELEASED_KINDS = ("microsoft", "timm", "transformers")


class InitSourceError(UserError, ValueError):
    """An init_from that names nothing the run can start from: the path and what was found there."""


def init_source_kind(value: str | Path, key: str = "init_from") -> tuple[str, Path]:
    """(kind, path) of an init_from value: "checkpoint" (its folder), "export" (its model.safetensors),
    "microsoft" (a release .pth), "timm" (a timm folder; a `timm:NAME` is Path(NAME)) or "transformers" (its
    folder); else InitSourceError naming the absolute path and what it holds."""
    if str(value).startswith(TIMM_PREFIX):
        name = str(value).removeprefix(TIMM_PREFIX)
        if not name.startswith("swin"):
            raise InitSourceError(
                f"{key}={value}: not a timm Swin (give e.g. timm:swin_base_patch4_window7_224.ms_in22k)"
            )
        return "timm", Path(name)
    path = Path(value)
    where = f"{key}={path.absolute()}"
    if not path.exists():
        raise InitSourceError(f"{where}: no such file or folder (give {ACCEPTED})")
    if path.is_dir():
        if (path / "COMPLETE").is_file():
            return "checkpoint", path
        if (path / "model.json").is_file():
            return "export", path / "model.safetensors"
        if (path / "config.json").is_file():
            return released_folder_kind(path, key), path
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
    if released_kind(path) == "microsoft":
        return "microsoft", path
    raise InitSourceError(
        f"{where} is a {path.suffix or 'file'} file, not weights this run can start from; give {ACCEPTED}"
    )


def released_folder_kind(folder: Path, key: str = "init_from") -> str:
    """ "transformers" or "timm" for a folder of released weights (swin_common/released_kind.py tells them apart);
    InitSourceError naming its config.json or the weights it lacks otherwise."""
    kind = released_kind(folder)
    if kind is not None:
        return kind
    config_path = folder / "config.json"
    config = folder_config(folder)
    if config is None:
        raise InitSourceError(f"{key}: {config_path.absolute()} is not a JSON object")
    if str(config.get("architecture", "")).startswith("swin"):
        raise InitSourceError(
            f"{key}={folder.absolute()}: no weights beside config.json (looked for {', '.join(TIMM_WEIGHTS)})"
        )
    said = config.get("model_type") or config.get("architecture") or "neither model_type nor architecture"
    raise InitSourceError(
        f"{key}: {config_path.absolute()} is not a Swin's config (it says {said}); a transformers folder says "
        f"model_type swin, a timm folder architecture swin_..."
    )


def weight_names(path: Path) -> set[str] | None:
    """The tensor names of a weights file from its header or pickle opcodes (nothing unpickled); None when only
    loading can tell (a legacy, non-zip torch file)."""
    if path.suffix == ".safetensors":
        return set(tensor_shapes(path))
    return pickled_strings(path)


def check_swin_names(path: Path, names: set[str] | None, swin_key: str, key: str = "init_from") -> None:
    """InitSourceError unless the names hold `key` and a relative position bias table (None: loading decides)."""
    if names is None or (swin_key in names and any(k.endswith(SWIN_SUFFIX) for k in names)):
        return
    sample = ", ".join(sorted(n for n in names if "." in n)[:3]) or "no tensor names"
    raise InitSourceError(
        f"{key}={path.absolute()} holds no Swin weights (no {swin_key} and relative position bias tables; "
        f"it holds {sample} ...)"
    )


def check_init_source(value: str | Path, key: str = "init_from") -> str:
    """Checks an init_from value from its headers (init_source_kind, then an export's model.json, the Swin names of
    the weights); returns what it is, for the log. Raises InitSourceError naming the file."""
    kind, found = init_source_kind(value, key)
    if kind == "checkpoint":
        if not (found / "synsets.txt").is_file():
            raise InitSourceError(f"{key}={found.absolute()}: a checkpoint without synsets.txt (its label layout)")
        return f"checkpoint {found}"
    if kind == "timm" and str(value).startswith(TIMM_PREFIX):
        return f"timm {found} (from the Hugging Face cache)"
    if kind == "microsoft":
        check_swin_names(found, weight_names(found), SWIN_KEYS[0], key)
        return f"released weights {found}"
    if kind in ("transformers", "timm"):
        weights = timm_weights_file(found)
        if weights is None:
            raise InitSourceError(
                f"{key}={found.absolute()}: no weights beside config.json (looked for {', '.join(TIMM_WEIGHTS)})"
            )
        swin_key = TRANSFORMERS_SWIN_KEY if kind == "transformers" else SWIN_KEYS[0]
        check_swin_names(weights, weight_names(weights), swin_key, key)
        return f"{kind} folder {found}"
    where = f"{key}={found.absolute()}"
    meta_path = found.with_name("model.json")
    if not found.is_file():
        raise InitSourceError(f"{where}: no such file (an export holds model.safetensors beside model.json)")
    if not meta_path.is_file():
        raise InitSourceError(f"{where}: no model.json beside it (its label layout is needed to map the head)")
    try:
        synsets = json.loads(meta_path.read_text())["synsets"]
    except (ValueError, KeyError, TypeError) as e:
        raise InitSourceError(f"{key}: {meta_path.absolute()} is not an export's model.json ({e})") from None
    check_swin_names(found, set(tensor_shapes(found)), SWIN_KEYS[0], key)  # refuses a pickle named .safetensors
    return f"exported model {found.parent} ({len(synsets)} classes)"
