"""manifest.json, the shard set's table of contents: what it holds, who writes and who reads it.

manifest.json: the shard set's table of contents (shards with sizes and sha256, totals, per-class counts, label
layout, rejected inputs, prep options). Written by `data_prep shard`/`finalize` (data_prep.records builds it),
read by `data_prep verify` and by training."""

from __future__ import annotations

import json

from swin_common.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "swin-pipeline-shards/1"  # what `data_prep shard` writes: shards under the manifest, labels in cls members
# a set indexed in place: its shards under `shards_root` (another folder or S3 prefix than the manifest's), or its
# labels a column of the split index (`split_indexes.<split>.label_column`); a reader of /1 only refuses it
# clearly instead of looking for the shards beside the manifest
FORMAT_2 = "swin-pipeline-shards/2"
FORMATS = (FORMAT, FORMAT_2)


class ManifestError(UserError, ValueError):
    """A manifest.json of another format than the ones this version reads."""


def manifest_format(manifest: dict) -> str:
    """The format a manifest must declare: /2 when it uses `shards_root` or a label column, else /1 (so the sets
    `data_prep shard` writes keep their manifest byte for byte)."""
    label_column = any(e.get("label_column") for e in manifest.get("split_indexes", {}).values())
    return FORMAT_2 if "shards_root" in manifest or label_column else FORMAT


def write_manifest(out, manifest: dict) -> None:
    out.write_bytes(MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(out) -> dict:
    if not out.exists(MANIFEST_NAME):
        raise FileNotFoundError(missing_manifest(out))
    where = f"{out.url}/{MANIFEST_NAME}"
    manifest = json.loads(out.read(MANIFEST_NAME))
    found = manifest.get("format")
    if found not in FORMATS:
        raise ManifestError(f"{where} has format {found!r}, expected {' or '.join(FORMATS)}")
    if found == FORMAT and manifest_format(manifest) != FORMAT:
        raise ManifestError(
            f"{where} has format {FORMAT} but uses shards_root or a label column, which need {FORMAT_2}"
        )
    return manifest


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PREP_RECORDS = ("synsets.txt", "_prep", "train", "val")  # what `data_prep shard` writes first into a set under way


def missing_manifest(out) -> str:
    """Why a store holds no manifest, in words, and the command that fits.

    Why a store holds no manifest, in words naming what it holds instead and the command that fits: a folder
    that does not exist, one split folder of a set, a source (per-synset tars or an ImageFolder tree), a folder of
    loose images, or a set whose prep has not been finalized."""
    root = getattr(out, "root", None)  # a local folder (LocalStore); S3 prefixes are never "missing" as such
    if root is not None and not root.exists():
        return (
            f"shard set not found: {out.url} does not exist (give the folder `python -m data_prep shard --out` "
            f"wrote, or s3://bucket/prefix)"
        )
    if root is not None and root.is_dir():
        found = describe_folder(root)
        if found:
            return found
    return (
        f"no {MANIFEST_NAME} in {out.url}: is the shard set finalized? (a set whose shards are all written "
        f"is finalized by `python -m data_prep finalize {out.url}`)"
    )


def describe_folder(root) -> str | None:
    """What a local folder that is not a shard set holds and the command that fits, or None.

    What a local folder that is not a shard set holds, and the command that fits; None when it looks like a
    set under way (or holds nothing this can tell)."""
    names = {p.name for p in root.iterdir()}
    if (root.parent / MANIFEST_NAME).is_file() and any(n.endswith(".idx") for n in names):
        return (
            f"{root} is the '{root.name}' split folder of the shard set {root.parent}, not a set: give "
            f"{root.parent} (the folder holding {MANIFEST_NAME}), and the split with data.train_split / "
            f"data.val_split or --split"
        )
    if set(PREP_RECORDS) & names:
        return None  # a set being written: its manifest comes last
    tars = [n for n in names if n.endswith(".tar")]
    folders = [n for n in names if (root / n).is_dir()]
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if tars:
        return (
            f"{root} is a source of {len(tars)} per-synset tars, not a shard set: shard it first, "
            f"`python -m data_prep shard --source {root} --out SHARDS`, and give SHARDS"
        )
    if folders and not images:
        return (
            f"{root} is a source (an ImageFolder tree of {len(folders)} class folders), not a shard set: shard "
            f"it first, `python -m data_prep shard --source {root} --out SHARDS`, and give SHARDS"
        )
    if images:
        return (
            f"{root} is a folder of {len(images)} loose images, not a shard set: `python -m data_prep shard` "
            f"reads an ImageFolder tree (a sub-folder per synset, e.g. {root}/n01440764/*.JPEG) or per-synset "
            f"tars; move the images into class folders, then `python -m data_prep shard --source {root} --out "
            f"SHARDS`"
        )
    return None
