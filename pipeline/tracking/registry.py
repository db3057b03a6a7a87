"""The MLflow model registry: an exported model registered as a model version, and pulled back by name and alias
(models:/NAME@ALIAS) or version (models:/NAME/VERSION).

A version is an MLflow pyfunc "models from code" model around the export (pipeline/tracking/mlflow_model.py:
MLmodel, one code file, requirements, input examples, the export under `artifacts/model/`), logged as the run's
`model/step_N/` artifacts, so MLflow's own `pyfunc.load_model` and `mlflow models serve` use it. The metadata to
rebuild and feed the model (timm architecture and kwargs, image size, window, synsets, preprocessing) is also set
as version tags, so it shows in the UI. This project's own pull lists a version's files first, refuses any file
outside the layout's allow-list, and downloads only `artifacts/model/`: it never imports, runs or unpickles
anything from the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.tracking import mlflow_model
from pipeline.tracking.store import Store, existing, reading_store
from swin_common.errors import UserError
from swin_common.safe_weights import file_sha256

log = logging.getLogger(__name__)
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def version_tags(meta: dict) -> dict[str, str]:
    pre = meta["preprocessing"]
    return {
        "timm_name": meta["timm_name"],
        "arch": meta["arch"],
        "img_size": str(meta["img_size"]),
        "window_size": str(meta["window_size"]),
        "num_classes": str(meta["num_classes"]),
        "mean": ",".join(map(str, pre["mean"])),
        "std": ",".join(map(str, pre["std"])),
        "crop_pct": str(pre["crop_pct"]),
        "interpolation": pre["interpolation"],
        "synsets_head": ",".join(meta["synsets"][:5]) + (" ..." if len(meta["synsets"]) > 5 else ""),
        # the first classes in words, beside their synsets (WordNet's first lemma; exports list them all)
        "labels_head": ", ".join(
            f"{s} {d.split(',')[0]}" if d else s
            for s, d in zip(meta["synsets"][:5], meta.get("label_descriptions") or [""] * 5, strict=False)
        )
        + (" ..." if len(meta["synsets"]) > 5 else ""),
    }


def register(
    client, run_id: str, model_dir: Path, name: str, aliases: list[str], tags: dict[str, str] | None = None
) -> str:
    """Logs model_dir as the run's `model/step_N/` artifacts and registers it with the version tags of its
    metadata plus `tags`; returns the version (the existing one when the same export was registered already,
    e.g. a call retried after an outage)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    # one artifact folder per exported step: a version's files never change after it is registered
    artifact_path = f"model/step_{meta.get('step', 0):08d}"
    check_model_folder(model_dir, str(model_dir))  # what a pull would refuse is never registered
    checksum = {mlflow_model.WEIGHTS_CHECKSUM: file_sha256(model_dir / mlflow_model.WEIGHTS_FILE)}
    # the server answers, and holds the run, before the export is packaged and uploaded
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    with tempfile.TemporaryDirectory(prefix="swin-register-") as tmp:
        client.log_artifacts(run_id, str(mlflow_model.build(model_dir, Path(tmp) / "version")), artifact_path)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001  (RESOURCE_DOES_NOT_EXIST)
        client.create_registered_model(name, description="Swin Transformer trained by swin-pipeline")
    # a retried call (after an outage) must not register the same weights twice
    same = [v for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'") if v.source == source]
    version = (
        same[0]
        if same
        else client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags={**version_tags(meta), **checksum, **(tags or {})},
            description=f"{meta['timm_name']}, {meta['num_classes']} classes",
        )
    )
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    log.info(
        "registered %s version %s (aliases: %s) from run %s", name, version.version, ", ".join(aliases) or "-", run_id
    )
    return str(version.version)


REGISTERED_RECORD = "registered.json"  # in a run folder once its own export is registered


def record_registration(run_dir: Path, name: str, version: str, aliases: list[str]) -> dict:
    """Writes and returns the run folder's record of its export's registration, which tells a rerun of a finished
    run that nothing is owed: {"registered": "models:/NAME/VERSION", "aliases": [...]}."""
    record = {"registered": f"models:/{name}/{version}", "aliases": list(aliases)}
    (Path(run_dir) / REGISTERED_RECORD).write_text(json.dumps(record) + "\n")
    return record


def registration_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / REGISTERED_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


class ModelURIError(UserError, ValueError):
    """A model reference that is not models:/NAME@ALIAS or models:/NAME/VERSION, or a name no folder can hold."""


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = MODELS_URI.match(uri)
    if not m:
        raise ModelURIError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def resolve_version(client, uri: str):
    name, alias, version = parse_models_uri(uri)
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def cache_root() -> Path:
    return Path(os.environ.get("SWIN_MODEL_CACHE", Path.home() / ".cache" / "swin-pipeline" / "models"))


# What a pulled export holds (mlflow_model.EXPORT_SUFFIXES: weights in safetensors, the rest text); anything
# else (a pickled torch/sklearn model, code) is refused, whatever its name.
MODEL_FILES = ("model.safetensors", "model.json")


def check_model_folder(folder: Path, uri: str) -> None:
    """Raises unless `folder` (what a registry version holds) is safetensors weights + json metadata only."""
    from swin_common.safe_weights import UnsafeModelFile, check_safetensors

    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{uri} holds no {' or '.join(missing)}: not a swin-pipeline export (model.safetensors + model.json)"
        )
    others = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_symlink() or (p.is_file() and not p.name.lower().endswith(mlflow_model.EXPORT_SUFFIXES))
    )
    if others:
        raise UnsafeModelFile(
            f"{uri} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}: refused, "
            f"a model version must hold only safetensors weights and json/text metadata "
            f"(a pickle or code could run when loaded)"
        )
    for weights in sorted(folder.rglob("*.safetensors")):
        check_safetensors(weights, origin=uri)


def _folder_name(name: str, uri: str) -> str:
    """A registered model's name as one folder of the cache: never `..`, a path or a NUL."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ModelURIError(f"{uri}: the registered model name {name!r} cannot be a folder name of the model cache")
    return name


NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class ModelNotFound(UserError, ValueError):
    """A registered model, version or alias that the store does not hold."""


def resolve_in_store(uri: str, store: Store):
    """(client, model version) of a models:/ URI in `store`, which must exist (store.existing: a read never
    creates one); a version or alias the store lacks is a ModelNotFound naming the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(existing(store).uri)
    try:
        return client, resolve_version(client, uri)
    except Exception as e:
        message = str(getattr(e, "message", e))
        # a local store answers RESOURCE_DOES_NOT_EXIST, a server INVALID_PARAMETER_VALUE for a missing alias
        if getattr(e, "error_code", None) not in NOT_FOUND_CODES or "not found" not in message.lower():
            raise
        found = re.sub(r"^[A-Z_]+: ", "", message).rstrip(".")
        raise ModelNotFound(
            f"{uri}: {found} in the MLflow store {store.redacted}: check the name, version or alias, "
            f"and that MLFLOW_TRACKING_URI (or --tracking-uri) names the store that holds it"
        ) from None


class WeightsMismatch(UserError, ValueError):
    """Weights whose sha256 is not the one the model version recorded at registration: another model's, or a
    file changed after it was pulled."""


def binding(store: Store, version) -> dict[str, str]:
    """What a pulled folder is bound to: the store, the model, the version and where its files are. A folder is
    reused only for the same binding (the same name and version in another store, or in a store made again, is
    another model)."""
    return {
        "store": store.identity,
        "name": version.name,
        "version": str(int(version.version)),
        "run_id": version.run_id or "",
        "source": version.source or "",
    }


def cache_folder(bound: dict[str, str], uri: str) -> Path:
    """<cache>/NAME/VERSION-KEY: KEY is a digest of the binding, so two stores' `NAME/1` never share a folder."""
    key = hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / _folder_name(bound["name"], uri) / f"{bound['version']}-{key}"


def pull_to_folder(uri: str, dst: str | Path | None = None, store: Store | None = None) -> Path:
    """Downloads the model version behind a models:/ URI into a folder and returns the folder holding
    model.safetensors and model.json, their weights checked against the sha256 the version recorded.

    The folder (`dst`, else the model cache: cache_folder) is bound to the version it holds (binding: store,
    name, version, run, source; recorded beside it as `.FOLDER.pulled.json`) and reused only for the same
    binding and only while its weights still have the recorded sha256 (a changed file is a WeightsMismatch
    naming it); otherwise the version is downloaded again and replaces it atomically. A version registered
    before checksums were recorded gets its tag at its first pull (said once). A version holding anything else
    than safetensors weights and json/text (a pickle named model.safetensors included) is refused, naming the URI.
    The store: `store`, else the one MLFLOW_TRACKING_URI names (store.reading_store); it must exist, and a version
    or alias it lacks is an error naming it."""
    store = store or reading_store(None, os.environ, Path.cwd())
    client, version = resolve_in_store(uri, store)
    bound = binding(store, version)
    folder = Path(dst).absolute() if dst else cache_folder(bound, uri)
    folder.parent.mkdir(parents=True, exist_ok=True)
    record_path = folder.with_name(f".{folder.name}.pulled.json")
    name = f"models:/{version.name}/{bound['version']}"
    # one download per cache: every rank of a node pulls at once, the first one downloads, the others wait here
    # and find it cached (a lock file beside the folder; flock works across nodes on a shared NFSv4 cache too)
    with _exclusive(folder.with_name(f".{folder.name}.lock")):
        record = _read_json(record_path)
        if record and record.get("binding") == bound and (folder / "model.json").is_file():
            check_model_folder(folder, uri)
            expected = (version.tags or {}).get(mlflow_model.WEIGHTS_CHECKSUM) or record.get("sha256")
            _check_weights(
                folder,
                expected,
                f"{uri} ({name} in {store.redacted})",
                "was changed after it was pulled: delete the folder to pull the version again",
            )
            log.info("%s -> %s, pulled before into %s", uri, name, folder)
            return folder
        if record is None and folder.is_dir() and any(folder.iterdir()) and not (folder / "model.json").is_file():
            raise FileExistsError(
                f"{folder} holds files but no model (no model.json): not replaced by the pull of "
                f"{uri}; give an empty or new folder"
            )
        record_path.unlink(missing_ok=True)  # the folder is replaced next: no record may vouch for it meanwhile
        _download(client, version, uri, folder, store)
        sha = _record_checksum(client, version, folder, uri, store)
        record_path.write_text(json.dumps({"binding": bound, "sha256": sha}, indent=1) + "\n")
        log.info("downloaded %s (%s) into %s", uri, name, folder)
    return folder


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_weights(folder: Path, expected: str | None, what: str, why: str) -> str:
    """The sha256 of the folder's weights, which must be `expected` (when there is one)."""
    weights = folder / mlflow_model.WEIGHTS_FILE
    sha = file_sha256(weights)
    if expected and sha != expected:
        raise WeightsMismatch(
            f"{what}: {weights} has sha256 {sha}, the version recorded {expected} when it was registered: {why}"
        )
    return sha


def _record_checksum(client, version, folder: Path, uri: str, store: Store) -> str:
    """Checks a downloaded folder's weights against the version's recorded sha256; a version registered before
    checksums were recorded gets its tag now (said once: later pulls find the tag)."""
    expected = (version.tags or {}).get(mlflow_model.WEIGHTS_CHECKSUM)
    name = f"models:/{version.name}/{int(version.version)}"
    try:
        sha = _check_weights(
            folder,
            expected,
            f"{uri} ({name} in {store.redacted})",
            "the store handed out other weights than it registered; nothing was kept",
        )
    except WeightsMismatch:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not expected:
        try:
            client.set_model_version_tag(version.name, version.version, mlflow_model.WEIGHTS_CHECKSUM, sha)
            recorded = "recorded it on the version now"
        except Exception as e:  # noqa: BLE001  (a user without edit rights: the pull goes on, checked locally)
            recorded = f"could not record it on the version ({type(e).__name__}): checked against this pull only"
        log.warning("%s was registered without a weights checksum: its sha256 is %s, %s", name, sha, recorded)
    return sha


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(client, version, uri: str, folder: Path, store: Store) -> None:
    """The version's export into `folder` (replacing what it held; the caller holds its lock): its file listing
    checked against the allow-list first, then only the export downloaded into a temporary folder, checked, and
    renamed."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    source = client.get_model_version_download_uri(version.name, version.version)
    repo = get_artifact_repository(source, tracking_uri=store.uri)
    files = list_files(repo)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # every rank of a job may pull at once
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        code_file = None
        if "MLmodel" in files:  # read as YAML data, for the name of its code file; never run
            code_file = mlflow_model.code_file_of(Path(repo.download_artifacts("MLmodel", str(tmp))).read_text(), uri)
        export = mlflow_model.check_version_files(files, uri, code_file)
        inner, downloads = tmp / "export", tmp / "download"
        inner.mkdir()
        downloads.mkdir()
        wanted = [f for f in files if export == "" or f.startswith(export + "/")]
        # one bar for the whole pull (on a terminal only; MLflow's per-file bars are off: swin_common.cli)
        # tqdm reads its TQDM_* settings when imported: imported here, after the train command has set
        # TQDM_DISABLE for a job's log, so that DeepSpeed's bars (the export's) obey it too
        from tqdm import tqdm

        for f in tqdm(wanted, desc=f"pulling {uri}", unit="file", disable=None, leave=False):
            target = inner / f[len(export) + 1 if export else 0 :]  # file by file: a folder is never taken whole
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(repo.download_artifacts(f, str(downloads)), target)
        if not (inner / "model.json").is_file():
            raise FileNotFoundError(
                f"{uri} (version {version.version}) holds no model.json in "
                f"{export or 'its root'}: not a swin-pipeline model"
            )
        check_model_folder(inner, uri)  # before it enters the cache
        if folder.exists():  # another version's files, or a broken leftover: the caller holds the folder's lock
            os.replace(folder, tmp / "replaced")
        os.replace(inner, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def list_files(repo, path: str | None = None) -> list[str]:
    """Every file under an artifact repository's root, as relative paths."""
    files: list[str] = []
    for info in repo.list_artifacts(path):
        files.extend(list_files(repo, info.path) if info.is_dir else [info.path])
    return files


def pull(uri: str, store: Store | None = None):
    """(timm model in eval mode, metadata) of a registered model (the store: as pull_to_folder's)."""
    from pipeline.engine.model_export import load_exported

    return load_exported(pull_to_folder(uri, store=store))
