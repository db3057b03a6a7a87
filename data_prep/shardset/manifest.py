"""manifest.json: the shard set's table of contents (shards with sizes and sha256, totals, per-class counts, label
layout, rejected inputs, prep options). Written by `data_prep shard`/`finalize` (data_prep.records builds it),
read by `data_prep verify` and by training."""
from __future__ import annotations

import json

MANIFEST_NAME = "manifest.json"
FORMAT = "swin-pipeline-shards/1"


def write_manifest(out, manifest: dict) -> None:
    out.write_bytes(MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(out) -> dict:
    if not out.exists(MANIFEST_NAME):
        raise FileNotFoundError(missing_manifest(out))
    manifest = json.loads(out.read(MANIFEST_NAME))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{out.url}/{MANIFEST_NAME} has format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def missing_manifest(out) -> str:
    """Why a store holds no manifest, in words: a folder that does not exist, a source (per-synset tars or an
    ImageFolder tree) given where a shard set belongs, or a set whose prep has not been finalized."""
    root = getattr(out, "root", None)  # a local folder (LocalStore); S3 prefixes are never "missing" as such
    if root is not None and not root.exists():
        return (f"shard set not found: {out.url} does not exist (give the folder `python -m data_prep shard --out` "
                f"wrote, or s3://bucket/prefix)")
    if root is not None and root.is_dir():
        names = {p.name for p in root.iterdir()}
        tars = [n for n in names if n.endswith(".tar")]
        folders = [n for n in names if (root / n).is_dir()]
        being_prepared = {"synsets.txt", "_prep", "train", "val"} & names  # what `data_prep shard` writes first
        if (tars or folders) and not being_prepared:
            kind = "per-synset tars" if tars else "an ImageFolder tree"
            return (f"{out.url} is a source ({kind}), not a shard set: shard it first, `python -m data_prep shard "
                    f"--source {out.url} --out SHARDS`, and give SHARDS")
    return f"no {MANIFEST_NAME} in {out.url}: is the shard set finalized?"
