"""What `init_from` may name, told apart and checked from the files' headers alone, without torch: a complete
checkpoint folder (its COMPLETE marker), an exported model folder, or its model.safetensors beside model.json.
The pre-launch check (`python -m pipeline.train --check`, which the launch scripts run before any rank starts)
and `model_export.load_source` share it, so a path the check lets through is one the ranks can read, and a path
it refuses is refused in one line naming the file and what was found there.

An export's weights must be Swin weights: the safetensors header (read as JSON; nothing unpickled) names
`patch_embed.proj.weight` and at least one `relative_position_bias_table`. Whether they fit the run's architecture
is the ranks' check (transfer.transfer_state), which needs the model built.
"""

from __future__ import annotations

import json
from pathlib import Path

from swin_common.errors import UserError
from swin_common.safe_weights import tensor_shapes

ACCEPTED = (
    "a complete checkpoint folder (runs/NAME/checkpoints/step_N), an exported model folder (runs/NAME/model: "
    "model.safetensors + model.json) or its model.safetensors, or models:/NAME@ALIAS"
)
SWIN_KEYS = ("patch_embed.proj.weight",)
SWIN_SUFFIX = "relative_position_bias_table"


class InitSourceError(UserError, ValueError):
    """An init_from that names nothing the run can start from: the path and what was found there."""


def init_source_kind(path: str | Path) -> tuple[str, Path]:
    """("checkpoint", folder) or ("export", its model.safetensors) for an init_from path, else InitSourceError
    naming the absolute path and what it holds."""
    path = Path(path)
    where = f"init_from={path.absolute()}"
    if not path.exists():
        raise InitSourceError(f"{where}: no such file or folder (give {ACCEPTED})")
    if path.is_dir():
        if (path / "COMPLETE").is_file():
            return "checkpoint", path
        if (path / "model.json").is_file():
            return "export", path / "model.safetensors"
        found = sorted(p.name for p in path.iterdir())[:5]
        hint = (
            ": it is a run folder, start from its model/ or a checkpoint under checkpoints/"
            if (path / "checkpoints").is_dir()
            else ""
        )
        raise InitSourceError(
            f"{where} is a folder without COMPLETE or model.json (it holds "
            f"{', '.join(found) or 'nothing'}){hint}; give {ACCEPTED}"
        )
    if path.suffix == ".safetensors":
        return "export", path
    kind = {
        ".pth": "a PyTorch pickle (.pth)",
        ".pt": "a PyTorch pickle (.pt)",
        ".bin": "a pickle (.bin)",
        ".ckpt": "a checkpoint pickle (.ckpt)",
    }.get(path.suffix.lower(), f"a {path.suffix or 'file'} file")
    raise InitSourceError(f"{where} is {kind}, not weights this run can start from (never unpickled); give {ACCEPTED}")


def check_init_source(path: str | Path) -> str:
    """Checks an init_from path from its headers (init_source_kind, then an export's model.json and the Swin
    names in its safetensors header); returns what it is, for the log. Raises InitSourceError naming the file."""
    kind, found = init_source_kind(path)
    if kind == "checkpoint":
        if not (found / "synsets.txt").is_file():
            raise InitSourceError(f"init_from={found.absolute()}: a checkpoint without synsets.txt (its label layout)")
        return f"checkpoint {found}"
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
    names = set(tensor_shapes(found))  # refuses a file that is not safetensors (a pickle under that name)
    if not all(k in names for k in SWIN_KEYS) or not any(k.endswith(SWIN_SUFFIX) for k in names):
        sample = ", ".join(sorted(names)[:3]) or "no tensors"
        raise InitSourceError(
            f"{where} holds no Swin weights (no patch_embed.proj.weight and relative position "
            f"bias tables; it holds {len(names)} tensors: {sample} ...)"
        )
    return f"exported model {found.parent} ({len(synsets)} classes)"
