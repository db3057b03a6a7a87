"""python -m pipeline.export CHECKPOINT --out DIR

Consolidates a training checkpoint (any ZeRO stage; DeepSpeed's zero_to_fp32 merges the partitions) into
DIR/model.safetensors + DIR/model.json: a plain timm state dict and what rebuilding and feeding the model
needs (architecture, image size, window, synsets, preprocessing). Training does this itself at the end
(<run>/model); use this for any other checkpoint, e.g. runs/NAME/checkpoints/step_00050000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from swin_common.cli import ArgumentParser, CommandError, command, exit_process


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="a complete checkpoint folder (holds COMPLETE)")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and model.json into")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        raise CommandError(
            f"checkpoint folder not found: {args.checkpoint} (give a runs/NAME/checkpoints/step_N folder)"
        )
    if not (Path(args.checkpoint) / "COMPLETE").is_file():
        raise CommandError(
            f"{args.checkpoint} is not a complete checkpoint (no COMPLETE marker): give one that "
            f"training finished writing"
        )
    from pipeline.engine.model_export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out))
    return 0


if __name__ == "__main__":
    exit_process(main())
