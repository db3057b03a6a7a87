"""python -m pipeline.pull models:/NAME@ALIAS | models:/NAME/VERSION [--dst DIR]

Downloads a registered model's export (model.safetensors, model.json, timm's config.json) from the MLflow registry
at --tracking-uri, else MLFLOW_TRACKING_URI, checks it (safetensors weights, json metadata; nothing is imported,
run or unpickled), and prints what it is and the folder. It imports neither torch nor timm: it answers in about
the time MLflow's client takes to import. In Python: `pipeline.tracking.registry.pull("models:/NAME@ALIAS")`
returns (timm model, metadata); `timm.create_model("local-dir:FOLDER", pretrained=True)` loads the folder too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.tracking.store import reading_store
from swin_common.cli import ArgumentParser, command, configure_logging, error_context, exit_process


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.pull", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument(
        "--dst",
        help="download into this folder (default: a cache by name and version, "
        "$SWIN_MODEL_CACHE or ~/.cache/swin-pipeline/models)",
    )
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    args = p.parse_args(argv)
    configure_logging(level=logging.WARNING, stream=sys.stderr)
    import json
    import math

    from pipeline.tracking.registry import pull_to_folder
    from swin_common.safe_weights import tensor_shapes

    with error_context(args.uri):
        folder = pull_to_folder(args.uri, args.dst, reading_store(args.tracking_uri, os.environ, Path.cwd()))
        meta = json.loads((folder / "model.json").read_text())
        params = sum(math.prod(shape) for shape in tensor_shapes(folder / "model.safetensors").values())
    print(
        f"{args.uri}: {meta['timm_name']}, {meta['num_classes']} classes, {params / 1e6:.2f}M parameters, "
        f"input {meta['img_size']}px (crop_pct {meta['preprocessing']['crop_pct']})"
    )
    print(folder)
    return 0


if __name__ == "__main__":
    exit_process(main())
