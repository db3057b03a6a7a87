"""python -m pipeline.register RUN_DIR [--name NAME] [--alias A ...]
   python -m pipeline.register --model DIR --name NAME [--alias A ...]   (an export no run of this project made)

Registers a run's exported model (RUN_DIR/model, or --model DIR) in the MLflow registry as a new version of
NAME (default: the run's name), in the MLflow run the training recorded (RUN_DIR/mlflow_run.json), and points
the aliases at it. Training does this itself at the end; use this when the server was down then, or to
register another export. The tracking URI is MLFLOW_TRACKING_URI, else the one the run recorded; a recorded URI
is stored redacted (no password or token), so for a server that needs credentials set MLFLOW_TRACKING_URI.

Without RUN_DIR, --model names an export that no training run made (python -m pipeline.import_model writes one
from released weights): it is registered from a new MLflow run of its own in the experiment "imported models"
(its source and head layout as parameters) at MLFLOW_TRACKING_URI or --tracking-uri, e.g. as the champion a
fine-tune must beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.tracking.store import ENV_VAR, reading_store, store_at
from swin_common.cli import ArgumentParser, CommandError, command, configure_logging, exit_process
from swin_common.redact import REDACTED


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", nargs="?", help="a training run's folder (runs/NAME); omit it for --model of an import")
    p.add_argument("--model", help="export folder to register (default RUN_DIR/model)")
    p.add_argument("--name", help="registered model name (default: the run's tracking.model_name or name)")
    p.add_argument("--alias", action="append", default=None, help="alias to set (repeatable; default: the config's)")
    p.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else the run's)")
    args = p.parse_args(argv)
    configure_logging(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.run_dir is None:
        return register_without_run(args)
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
    store = reading_store(args.tracking_uri, os.environ, Path.cwd(), recorded=record["tracking_uri"])
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


IMPORTS_EXPERIMENT = "imported models"


def register_without_run(args) -> int:
    """Registers --model (an export no run of this project made) from a new MLflow run of its own."""
    if not args.model or not args.name:
        raise CommandError("give RUN_DIR, or --model DIR and --name NAME for an export no run made (an import)")
    model_dir = Path(args.model)
    if not (model_dir / "model.json").is_file():
        raise CommandError(
            f"{model_dir.absolute()} holds no exported model (no model.json): python -m pipeline.import_model "
            f"SOURCE --out {model_dir}"
        )
    uri = args.tracking_uri or os.environ.get(ENV_VAR)
    if not uri:
        raise CommandError(f"no MLflow store given: set {ENV_VAR} or pass --tracking-uri (a local store is made there)")
    store = store_at(uri, Path.cwd())  # registering writes: a local store that is not there yet is made
    meta = json.loads((model_dir / "model.json").read_text())
    source = meta.get("source") or {}
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import register

    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(IMPORTS_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(IMPORTS_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"import {model_dir.name}")
    for key, value in {
        "model_dir": str(model_dir.absolute()),
        "source": source.get("description", "an export"),
        "source_format": source.get("format", "export"),
        "head_layout": source.get("head_layout", "model.json synsets"),
        "timm_name": meta.get("timm_name", ""),
    }.items():
        client.log_param(run.info.run_id, key, value)
    aliases = args.alias or []
    try:
        version = register(client, run.info.run_id, model_dir, args.name, aliases)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"models:/{args.name}/{version}" + "".join(f"  models:/{args.name}@{a}" for a in aliases))
    return 0


if __name__ == "__main__":
    exit_process(main())
