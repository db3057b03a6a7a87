"""Local MLflow stores (sqlite + an artifact folder) and exports with known outputs, for the registry tests that need
several stores or versions without a server or a training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient


def local_store(root: Path) -> str:
    """The tracking URI of a new local store in `root` (sqlite), its artifacts in `root/artifacts`."""
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def register_export(uri: str, name: str, export: Path, aliases: tuple[str, ...] = ("candidate",)) -> str:
    """`export` registered in the store as the next version of `name` by this project's own register (a run of
    its own); returns the version."""
    from pipeline.tracking.registry import register

    client = MlflowClient(uri)
    root = Path(uri[len("sqlite:///") :]).parent
    experiment = client.get_experiment_by_name("registered")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("registered", artifact_location=(root / "artifacts").as_uri())
    )
    run_id = client.create_run(experiment_id).info.run_id
    version = register(client, run_id, export, name, list(aliases))
    client.set_terminated(run_id)
    return version


def constant_export(folder: Path, synsets: list[str], label: int, logit: float, seed: int = 0) -> Path:
    """A tiny Swin export whose output is the same for every image: its classifier's weights are zero and its bias
    `logit` at class `label`, 0 elsewhere. Its predictions and scores are known exactly: top-1 is `label` with
    probability e^logit / (e^logit + n - 1) on every image (constant_scores for a set)."""
    from safetensors.torch import save_file

    from pipeline.config import RunConfig
    from pipeline.engine.model_export import model_metadata, write_timm_config
    from pipeline.model import create_model

    torch.manual_seed(seed)
    model = create_model("swin_nano", 64, 4, len(synsets))
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.zero_()
        model.head.fc.bias[label] = logit
    cfg = RunConfig()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size = "swin_nano", 64, 4
    meta = {**model_metadata(cfg, synsets), "step": 1}
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(meta))
    write_timm_config(model, folder, meta)
    return folder


def constant_scores(label: int, logit: float, labels: list[int], classes: int) -> dict[str, float]:
    """The loss and top-1 (percent) of a constant_export on samples with these labels."""
    log_z = torch.logsumexp(torch.tensor([logit] + [0.0] * (classes - 1), dtype=torch.float64), 0).item()
    hits = sum(y == label for y in labels)
    return {"loss": log_z - logit * hits / len(labels), "top1": 100.0 * hits / len(labels)}
