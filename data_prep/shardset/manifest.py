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
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out.url}: is the shard set finalized?")
    manifest = json.loads(out.read(MANIFEST_NAME))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{out.url}/{MANIFEST_NAME} has format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest
