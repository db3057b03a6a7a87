"""python -m pipeline.pull models:/NAME@ALIAS | models:/NAME/VERSION [--dst DIR]

Downloads a registered model (model.safetensors + model.json) from the MLflow registry at MLFLOW_TRACKING_URI,
builds the timm model from it to check it loads, and prints the folder. In Python:
`pipeline.tracking.registry.pull("models:/NAME@ALIAS")` returns (timm model, metadata).
"""
from __future__ import annotations

import argparse
import logging
import sys

from swin_common.cli import ArgumentParser, command, configure_logging, error_context, exit_process


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pipeline.pull", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--dst", help="download into this folder (default: a cache by name and version, "
                                 "$SWIN_MODEL_CACHE or ~/.cache/swin-pipeline/models)")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    args = p.parse_args(argv)
    configure_logging(level=logging.WARNING, stream=sys.stderr)
    from pipeline.engine.model_export import load_exported
    from pipeline.tracking.registry import pull_to_folder

    with error_context(args.uri):
        folder = pull_to_folder(args.uri, args.dst, args.tracking_uri)
        model, meta = load_exported(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.uri}: {meta['timm_name']}, {meta['num_classes']} classes, {params / 1e6:.2f}M parameters, "
          f"input {meta['img_size']}px (crop_pct {meta['preprocessing']['crop_pct']})")
    print(folder)
    return 0


if __name__ == "__main__":
    exit_process(main())
