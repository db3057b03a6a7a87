"""Small shard sets of the kind `data_prep index` will describe: tars this project did not write (any member
names, png/webp images, labels as cls members or as values), indexed in place with the index possibly in another
folder than the shards. Written here by hand from the shard-set contract's own pieces (members.group_samples,
the DALI index format, write_split_indexes), so the reader side is tested before the index job exists."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.shardset.index import format_index
from data_prep.shardset.manifest import MANIFEST_NAME, manifest_format
from data_prep.shardset.members import group_samples, tar_members
from data_prep.shardset.split_index import write_split_indexes
from data_prep.shardset.store import LocalStore

# a sample: (key, {suffix: bytes}, label)
Sample = tuple[str, dict[str, bytes], int]


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    """n small RGB pictures of different sizes (smooth, so JPEG keeps them close)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = 40 + 7 * (i % 5), 30 + 5 * (i % 7)
        y, x = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 200, 3)
        rgb = np.stack([(base[c] + (x * (c + 1) + y * (3 - c)) % 56) for c in range(3)], -1).astype(np.uint8)
        out.append(Image.fromarray(rgb))
    return out


def write_tar(path: Path, samples: list[Sample], cls: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members, label in samples:
            files = dict(members)
            if cls:
                files["cls"] = str(label).encode()
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_set(
    index_root: Path,
    data_root: Path,
    shards: dict[str, list[list[Sample]]],
    synsets: list[str],
    shards_root: str | None = None,
    label_column: bool = False,
    tar_name: str = "{split}/wds-{split}-{i:04d}.tar",
) -> dict:
    """Writes every split's tars under data_root (named by `tar_name`), their `.idx` (and with `label_column`
    their labels files, and no cls members) under index_root, the split indexes and the manifest; returns it.
    `shards_root` goes into the manifest as given (None: the shards are in the index folder)."""
    index = LocalStore(index_root)
    entries = []
    for split, tars in shards.items():
        for i, samples in enumerate(tars):
            name = tar_name.format(split=split, i=i)
            path = data_root / name
            write_tar(path, samples, cls=not label_column)
            with tarfile.open(path) as tar:
                grouped = list(group_samples(tar_members(tar)))
            components = [[(ext, m.offset, m.size, m.name) for ext, m in s.members.items()] for s in grouped]
            entry = {
                "name": name,
                "index": f"{split}/shard-{i:06d}.idx",
                "split": split,
                "samples": len(grouped),
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
            index.write_bytes(entry["index"], format_index(components).encode())
            if label_column:
                entry["labels"] = f"{split}/shard-{i:06d}.labels.npy"
                buf = io.BytesIO()
                np.save(buf, np.array([label for _k, _m, label in samples], np.int32))
                index.write_bytes(entry["labels"], buf.getvalue())
            entries.append(entry)
    totals = {
        split: {
            "shards": sum(e["split"] == split for e in entries),
            "samples": sum(e["samples"] for e in entries if e["split"] == split),
            "bytes": sum(e["bytes"] for e in entries if e["split"] == split),
        }
        for split in shards
    }
    manifest: dict = {
        "label_layout": {"file": "synsets.txt", "num_classes": len(synsets), "synsets": synsets},
        "totals": totals,
        "shards": entries,
        "split_indexes": write_split_indexes(index, entries),
    }
    if shards_root is not None:
        manifest["shards_root"] = shards_root
    manifest = {"format": manifest_format(manifest), **manifest}
    (index_root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
