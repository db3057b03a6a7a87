"""What a training run records beside its metrics, as MLflow params and tags: the resolved config (flattened),
the shard manifest's hash and counts, package versions, the git state; every value made safe to send.

Secrets never reach MLflow: params whose key looks like a key/token/secret/password are blanked, and every value
goes through the project's one redaction function (swin_common.redact.redact_text: URI passwords, query-string
tokens, secret environment values).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_prep.shardset.store import open_store
from swin_common.gpu import dali_package
from swin_common.redact import REDACTED, SECRET_NAME, redact_text, secret_values

log = logging.getLogger(__name__)
PACKAGES = ("torch", "timm", "deepspeed", "mlflow", "numpy")


def redact(params: Mapping[str, object], env: dict[str, str] | None = None) -> dict[str, str]:
    """String values safe to send to MLflow: secret-looking keys blanked, every value through redact_text
    (URI passwords, query-string tokens, secret environment values of `env`, default this process's)."""
    secrets = secret_values(env)
    return {
        k: REDACTED if SECRET_NAME.search(k.rsplit(".", 1)[-1]) else redact_text(str(v), secrets)
        for k, v in params.items()
    }


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_params(config: dict, world_size: int, extra: dict) -> dict[str, object]:
    """A run's params: its config (config_to_dict, flattened, lists as comma-separated text), its world size and
    `extra` (what the caller adds: DeepSpeed config, manifest, versions, ...)."""
    params = {**flatten(config), "world_size": world_size, **extra}
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in params.items()}


def git_state(repo: Path) -> dict[str, str]:
    """The repository's commit and whether tracked files changed, as tags; {} outside a git checkout."""

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def package_versions() -> dict[str, str]:
    """version.NAME of the packages a run depends on, whichever DALI wheel included; missing ones left out."""
    out = {}
    dali = dali_package()  # whichever DALI wheel is installed (nvidia-dali-cuda120, -cuda130, ...)
    if dali is not None:
        out[f"version.{dali[0]}"] = dali[1]
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            pass
    return out


def manifest_params(shards: str) -> dict[str, object]:
    """Hash and counts of the shard set's manifest (its identity for this run); an unreadable one is recorded as
    data.manifest_error, never fatal."""
    try:
        raw = open_store(shards).read("manifest.json")
    except Exception as e:  # noqa: BLE001  (recorded, never fatal)
        return {"data.manifest_error": str(e)[:200]}
    manifest = json.loads(raw)
    out = {
        "data.manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "data.num_classes": manifest.get("label_layout", {}).get("num_classes", 0),
    }
    for split, totals in manifest.get("totals", {}).items():
        out[f"data.{split}_samples"] = totals.get("samples")
        out[f"data.{split}_shards"] = totals.get("shards")
    return out
