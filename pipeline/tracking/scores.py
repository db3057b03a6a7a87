"""A model version's evaluation scores on a shard set, kept as tags of the version in the MLflow registry, so the
UI shows each version's scores on each set (`python -m pipeline.evaluate` writes and reads them):

    eval.<set_id>.<split>.loss      mean cross-entropy                  e.g. 0.412345
    eval.<set_id>.<split>.top1      top-1 accuracy, percent             e.g. 84.444444
    eval.<set_id>.<split>.top5      top-5 accuracy, percent
    eval.<set_id>.<split>.samples   samples scored (every sample of the split once)
    eval.<set_id>.<split>.shards    where the set was read (credentials redacted)

`set_id` names one shard set's content: the set folder's (or S3 prefix's) last name plus the first 8 hex digits of
the sha256 of its manifest.json, e.g. `imagenet1k_val-3f2a9c1d`: the same set copied elsewhere (another bucket, a
node's disk) keeps its id, a re-sharded or re-finalized set gets a new one.

Scores are written with 6 decimals (one sample in 100 million still shows) and compared as written: a
comparison between a fresh score and one read back from tags never turns on digits the tags do not hold.
"""

from __future__ import annotations

import hashlib
import re

from swin_common.redact import redact_text

SCORES = ("loss", "top1", "top5", "samples")
PREFIX = "eval"
DIGITS = 6
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def shard_set_id(url: str, manifest: bytes) -> str:
    """A short, stable id of a shard set: its folder's last name (S3: the prefix's, else the bucket's) and the first
    8 hex digits of its manifest's sha256, in characters any tag key takes."""
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "set"
    name = _UNSAFE.sub("_", tail).strip("_") or "set"
    return f"{name}-{hashlib.sha256(manifest).hexdigest()[:8]}"


def score_key(set_id: str, split: str, what: str) -> str:
    return f"{PREFIX}.{set_id}.{_UNSAFE.sub('_', split)}.{what}"


def as_recorded(scores: dict) -> dict:
    """The scores as tags hold them (rounded to DIGITS decimals; samples an int)."""
    return {
        "loss": round(float(scores["loss"]), DIGITS),
        "top1": round(float(scores["top1"]), DIGITS),
        "top5": round(float(scores["top5"]), DIGITS),
        "samples": int(scores["samples"]),
    }


def version_scores(client, name: str, version: str | int, set_id: str, split: str) -> dict | None:
    """The scores recorded for this version on this set and split ({loss, top1, top5, samples, shards}), or None
    when it has none (or an incomplete or unreadable record)."""
    tags = client.get_model_version(name, str(version)).tags or {}
    try:
        values = {what: tags[score_key(set_id, split, what)] for what in SCORES}
        scores = as_recorded({what: float(value) for what, value in values.items()})
    except (KeyError, ValueError):
        return None
    return {**scores, "shards": tags.get(score_key(set_id, split, "shards"), "")}


def record_scores(client, name: str, version: str | int, set_id: str, split: str, scores: dict, shards: str) -> dict:
    """Sets the version's tags for this set and split; returns the scores as recorded. `scores`: loss, top1,
    top5, samples; `shards`: where the set was read (redacted here)."""
    recorded = as_recorded(scores)
    values = {
        "loss": f"{recorded['loss']:.{DIGITS}f}",
        "top1": f"{recorded['top1']:.{DIGITS}f}",
        "top5": f"{recorded['top5']:.{DIGITS}f}",
        "samples": str(recorded["samples"]),
        "shards": redact_text(shards),
    }
    for what, value in values.items():
        client.set_model_version_tag(name, str(version), score_key(set_id, split, what), value)
    return {**recorded, "shards": values["shards"]}


def alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` names in the registered model `name`, or None when it names none (the model must exist:
    an unknown model raises MLflow's RESOURCE_DOES_NOT_EXIST)."""
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(alias)
    return None if version is None else str(version)


def move_alias(client, name: str, alias: str, version: str | int) -> str | None:
    """Points `alias` of `name` at `version`; returns the version it named before (None: it named none)."""
    before = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    return before
