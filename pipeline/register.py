"""python -m pipeline.register RUN_DIR [--name NAME] [--alias A ...]

Registers a run's exported model (RUN_DIR/model, or --model DIR) in the MLflow registry as a new version of
NAME (default: the run's name), in the MLflow run the training recorded (RUN_DIR/mlflow_run.json), and points
the aliases at it. Training does this itself at the end; use this when the server was down then, or to
register another export. The tracking URI is the run's, unless MLFLOW_TRACKING_URI says otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.register", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's folder (runs/NAME)")
    p.add_argument("--model", help="export folder to register (default RUN_DIR/model)")
    p.add_argument("--name", help="registered model name (default: the run's tracking.model_name or name)")
    p.add_argument("--alias", action="append", default=None, help="alias to set (repeatable; default: the config's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    run_dir = Path(args.run_dir)
    record_file = run_dir / "mlflow_run.json"
    if not record_file.is_file():
        print(f"error: {record_file} not found: that run was not tracked in MLflow", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else run_dir / "model"
    if not (model_dir / "model.json").is_file():
        print(f"error: {model_dir} holds no exported model (python -m pipeline.export ...)", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.tracking.registry import register

    cfg = load_config(run_dir / "config.yaml")
    record = json.loads(record_file.read_text())
    uri = os.environ.get("MLFLOW_TRACKING_URI") or record["tracking_uri"]
    name = args.name or cfg.tracking.model_name or cfg.name
    aliases = args.alias if args.alias is not None else cfg.tracking.aliases
    version = register(MlflowClient(uri), record["run_id"], model_dir, name, aliases)
    print(f"models:/{name}/{version}" + "".join(f"  models:/{name}@{a}" for a in aliases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
