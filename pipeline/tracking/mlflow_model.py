"""What a registered version holds: an MLflow pyfunc "models from code" model around the project's export.

    MLmodel                      MLflow's description: flavour, signature, the code file, requirements
    swin_pyfunc.py               the one code file (pipeline/tracking/swin_pyfunc.py, copied by MLflow)
    requirements.txt, python_env.yaml, conda.yaml
    input_example.json, serving_input_example.json
    artifacts/model/             the export: model.safetensors, model.json, timm's config.json

`build` writes that folder from an export (MLflow's own `save_model`, then MLmodel stripped of the paths it
records of the training host); `check_version_files` is the allow-list this project's pull applies to a version's
file listing before it downloads anything, and `EXPORT_PATH` is all it downloads. Versions registered before this
layout (the export folder itself: model.safetensors + model.json at the root) still pull.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath

from swin_common.errors import UserError

CODE_FILE = Path(__file__).with_name("swin_pyfunc.py")
EXPORT_PATH = "artifacts/model"  # the export inside a version: the only folder this project's pull downloads
ENV_FILES = ("requirements.txt", "python_env.yaml", "conda.yaml")
EXAMPLE_FILES = ("input_example.json", "serving_input_example.json")
# what MLflow's own tools write into a version's folder on a local store (`pyfunc.load_model`, `models serve`:
# a YAML of the model's name and version): bookkeeping read by nobody here, never downloaded by the pull
MLFLOW_BOOKKEEPING = ("registered_model_meta",)
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_CHECKSUM = "weights_sha256"  # the export's weights' sha256: a version tag, and the pyfunc's model_config
# what the code file imports, pinned at the versions that trained and exported the model (MLflow would otherwise
# infer them by loading the model in a subprocess); torchvision: timm's transforms
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas")
# what an export may hold: weights in safetensors, the rest text (model.json, timm's config.json, notes)
EXPORT_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".yaml", ".yml")


class UnexpectedVersionFile(UserError, ValueError):
    """A registered version holds a file outside the allow-list (a pickle, more code, ...): nothing is pulled."""


def pinned_requirements() -> list[str]:
    """`name==version` of the serving packages as installed here, without a local build label (+cu130): pip
    finds the release on any index."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("string", "name"),
                ColSpec("double", "probability"),
                ColSpec(Array("string"), "top_labels"),
                ColSpec(Array("double"), "top_probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", 5)]),
    )


def input_example():
    """One small JPEG (a colour gradient made here: no data set needed at registration)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (48, 1)), np.tile(ramp[::-1], (48, 1)), np.full((48, 64), 128, np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return pd.DataFrame({"image": [buf.getvalue()]})


def build(export_dir: str | Path, dst: str | Path) -> Path:
    """<dst> (new): the MLflow model of an export folder, as a version holds it. Its MLmodel carries the
    weights' sha256 as the pyfunc's model_config (WEIGHTS_CHECKSUM), which the code file checks when it loads."""
    import mlflow

    from swin_common.safe_weights import file_sha256

    export_dir, dst = Path(export_dir), Path(dst)
    with tempfile.TemporaryDirectory(prefix="swin-mlflow-model-") as tmp:
        staged = Path(tmp) / "model"  # MLflow names the artifact folder after the source folder
        shutil.copytree(export_dir, staged, copy_function=_link_or_copy)
        if not (staged / "config.json").is_file():  # an export made before timm's config was part of it
            from pipeline.engine.model_export import load_exported, write_timm_config

            model, meta = load_exported(staged)
            write_timm_config(model, staged, meta)
        mlflow.pyfunc.save_model(
            str(dst),
            python_model=str(CODE_FILE),
            artifacts={"model": str(staged)},
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pinned_requirements(),
            model_config={WEIGHTS_CHECKSUM: file_sha256(staged / WEIGHTS_FILE)},
        )
    strip_host_paths(dst / "MLmodel")
    return dst


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def strip_host_paths(mlmodel: Path) -> None:
    """MLflow records where the code file and the artifacts were on the saving host (absolute paths, here a
    temporary folder and the repository); loading needs only the names inside the version."""
    import yaml

    doc = yaml.safe_load(mlmodel.read_text())
    pyfunc = doc["flavors"]["python_function"]
    pyfunc["model_code_path"] = PurePosixPath(pyfunc["model_code_path"]).name
    for artifact in (pyfunc.get("artifacts") or {}).values():
        artifact.pop("uri", None)
    mlmodel.write_text(yaml.safe_dump(doc, sort_keys=False))


def code_file_of(mlmodel_text: str, uri: str) -> str:
    """The code file a version's MLmodel names (read as YAML data only)."""
    import yaml

    try:
        doc = yaml.safe_load(mlmodel_text)
        name = doc["flavors"]["python_function"]["model_code_path"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UnexpectedVersionFile(
            f"{uri}: its MLmodel names no code file (flavors.python_function."
            f"model_code_path): not a swin-pipeline model ({e})"
        ) from None
    name = PurePosixPath(str(name)).name
    if not name.endswith(".py"):
        raise UnexpectedVersionFile(f"{uri}: its MLmodel names {name!r} as the code file: not a .py file")
    return name


def check_version_files(files: list[str], uri: str, code_file: str | None) -> str:
    """The folder of `files` (a version's file listing, relative paths) that holds the export: EXPORT_PATH, or ""
    for a version registered before the MLflow model layout. Raises UnexpectedVersionFile naming the first file
    outside the allow-list: MLmodel, its one code file, the requirement and env files, the input examples and
    EXPORT_PATH/** (or, for an old version, the export's own files at the root), and MLflow's own bookkeeping
    (MLFLOW_BOOKKEEPING, data that is never downloaded); an export holds only safetensors weights and json/text
    metadata."""

    def refuse(unexpected: list[str], rule: str):
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UnexpectedVersionFile(
            f"{uri} holds {unexpected[0]}{more}: refused, {rule} (a pickle or code could "
            f"run when loaded); nothing was downloaded"
        )

    mlflow_layout = "MLmodel" in files
    export = EXPORT_PATH if mlflow_layout else ""
    in_export = [f for f in files if not mlflow_layout or f.startswith(EXPORT_PATH + "/")]
    if mlflow_layout:
        allowed = {"MLmodel", *ENV_FILES, *EXAMPLE_FILES, *MLFLOW_BOOKKEEPING} | ({code_file} if code_file else set())
        unexpected = sorted(set(files) - set(in_export) - allowed)
        if unexpected:
            refuse(
                unexpected,
                f"a version may hold only MLmodel, its code file {code_file}, "
                f"{', '.join(ENV_FILES + EXAMPLE_FILES)} and {EXPORT_PATH}/",
            )
        if not in_export:
            raise FileNotFoundError(f"{uri} holds no {EXPORT_PATH}/: not a swin-pipeline model")
    unsafe = sorted(f for f in in_export if not f.lower().endswith(EXPORT_SUFFIXES))
    if unsafe:
        refuse(unsafe, f"{export or 'a model version'} may hold only safetensors weights and json/text metadata")
    return export
