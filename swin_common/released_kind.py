"""Which kind of released Swin a source names, told from its path and JSON alone (no torch, no timm), so that the
pre-launch check (init_source), which runs before torch is imported, can tell it the way the reader will.

- "microsoft": a .pth/.pt/.bin file (Microsoft's release files: a pickle, read with weights_only)
- "timm": a "timm:NAME" string, or a folder with timm's config.json (an "architecture" key) and weights
- "transformers": a folder whose config.json has model_type "swin" (what save_pretrained writes)
- None: anything else, this project's own export folder (model.json beside timm's config.json) included

pipeline.model.released re-exports `released_kind` and reads each kind (`read_released`).
"""

from __future__ import annotations

import json
from pathlib import Path

TIMM_PREFIX = "timm:"
MICROSOFT_SUFFIXES = (".pth", ".pt", ".bin")
# the weights files timm's local-dir: loading picks, in its order of preference
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def released_kind(source: str | Path) -> str | None:
    """ "microsoft", "timm", "transformers" or None for an init_from/import source; looks at paths and JSON only."""
    if isinstance(source, str) and source.startswith(TIMM_PREFIX):
        return "timm"
    path = Path(source)
    if path.is_file():
        return "microsoft" if path.suffix.lower() in MICROSOFT_SUFFIXES else None
    if not path.is_dir() or (path / "model.json").exists():  # model.json: this project's export
        return None
    config = folder_config(path)
    if config is None:
        return None
    if config.get("model_type") == "swin":
        return "transformers"
    if "architecture" in config and timm_weights_file(path) is not None:
        return "timm"
    return None


def folder_config(folder: Path) -> dict | None:
    """The folder's config.json as a dict, or None where there is none or it is not a JSON object."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def timm_weights_file(folder: Path) -> Path | None:
    """The weights file timm's local-dir: loading would read in `folder`, or None."""
    return next((folder / name for name in TIMM_WEIGHTS if (folder / name).is_file()), None)
