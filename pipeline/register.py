"""python -m pipeline.register RUN_DIR [--name NAME] [--alias A ...]

Registers a run's exported model (RUN_DIR/model, or --model DIR) in the MLflow registry as a new version of
NAME (default: the run's name), in the MLflow run the training recorded (RUN_DIR/mlflow_run.json), and points
the aliases at it. Training does this itself at the end; use this when the server was down then, or to
register another export. The tracking URI is MLFLOW_TRACKING_URI, else the one the run recorded; a recorded URI
is stored redacted (no password or token), so for a server that needs credentials set MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.tracking.store import reading_store
from swin_common.cli import ArgumentParser, CommandError, command, configure_logging, exit_process
from swin_common.redact import REDACTED


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="a training run's folder (runs/NAME)")
    p.add_argument("--model", help="export folder to register (default RUN_DIR/model)")
    p.add_argument("--name", help="registered model name (default: the run's tracking.model_name or name)")
    p.add_argument("--alias", action="append", default=None, help="alias to set (repeatable; default: the config's)")
    args = p.parse_args(argv)
    configure_logging(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CommandError(f"run folder not found: {run_dir} (give a training run's folder, runs/NAME)")
    record_file = run_dir / "mlflow_run.json"
    if not record_file.is_file():
        raise CommandError(
            f"{record_file} not found: that run was not tracked in MLflow (start the server and "
            f"rerun the training, which continues from its last checkpoint)"
        )
    record = json.loads(record_file.read_text())
    store = reading_store(None, os.environ, Path.cwd(), recorded=record["tracking_uri"])
    if REDACTED in store.uri:
        raise CommandError(
            f"{record_file} holds the tracking URI without its credentials ({store.redacted}): set "
            f"MLFLOW_TRACKING_URI to the full URI (with the password or token) and rerun"
        )
    model_dir = Path(args.model) if args.model else run_dir / "model"
    if not (model_dir / "model.json").is_file():
        raise CommandError(
            f"{model_dir} holds no exported model: python -m pipeline.export CHECKPOINT --out {model_dir}"
        )
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.tracking.registry import record_registration, register

    cfg = load_config(run_dir / "config.yaml")
    name = args.name or cfg.tracking.model_name or cfg.name
    aliases = args.alias if args.alias is not None else cfg.tracking.aliases
    version = register(MlflowClient(store.uri), record["run_id"], model_dir, name, aliases)
    if model_dir == run_dir / "model":  # the run's own export: a rerun of the training has nothing left to do
        record_registration(run_dir, name, version, aliases)
    print(f"models:/{name}/{version}" + "".join(f"  models:/{name}@{a}" for a in aliases))
    return 0


if __name__ == "__main__":
    exit_process(main())
