"""Shared fixtures: the embedded dataset in both source layouts, real photos and bad inputs, a CLI runner."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import servers
from data_prep.embedded import write_imagefolder, write_synset_tars, write_tar

# session fixtures: one server per run
from servers import REPO, mlflow_server, s3_server, slurm_cluster, slurm_two_nodes, ssh_nodes  # noqa: F401


def run_prep(*args, env: dict | None = None, **kwargs):
    """Runs `python -m data_prep ARGS` as a user would, with `env` added to this environment."""
    return servers.run_prep(*args, env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture
def s3_in_env(s3_server, monkeypatch):  # noqa: F811  (the fixture imported above)
    """The S3 server, with its endpoint and credentials in this process's AWS_* environment."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def without_split_indexes(folder: Path) -> Path:
    """The set with its split indexes taken away: no `split_indexes` in the manifest, no index.npz (refused by
    open_shard_set until `data_prep finalize` writes them again)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest.pop("split_indexes").values():
        (folder / entry["name"]).unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def damage_split_index(folder: Path, split: str = "train") -> Path:
    """The set with its split's index.npz cut short (no longer the manifest's sha256): read from the shards' own
    `.idx` files instead, with a warning."""
    index = folder / split / "index.npz"
    index.write_bytes(index.read_bytes()[:-10])
    return folder


def read_tree(root: Path) -> dict[str, bytes]:
    """Every shard-set file that must be reproducible (shards, indexes, layout, manifest) by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith("_")
    }


def read_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def photos() -> dict[str, np.ndarray]:
    """Real photographs that scikit-image ships (no download)."""
    import skimage.data as sd

    return {
        "astronaut": sd.astronaut(),
        "coffee": sd.coffee(),
        "chelsea": sd.chelsea(),
        "rocket": sd.rocket(),
        "camera": sd.camera(),
        "logo": sd.logo(),
    }


@pytest.fixture(scope="session")
def digits_tars(tmp_path_factory) -> Path:
    return write_synset_tars(tmp_path_factory.mktemp("digits") / "tars")


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("digits") / "folder")


@pytest.fixture(scope="session")
def shards(digits_tars, tmp_path_factory) -> Path:
    """The training modules' shard set (250 images per shard, 10 per class held out for val), made once per
    session: read-only (a test that alters a set copies it first)."""
    out = tmp_path_factory.mktemp("shards") / "digits"
    run_prep("shard", "--source", digits_tars, "--out", out, "--max-samples", 250, "--holdout-per-class", 10)
    return out


@pytest.fixture(scope="session")
def bad_inputs() -> dict[str, bytes]:
    """One file per kind of bad input a 22K crawl holds, each named like an ImageNet JPEG."""
    pics = photos()
    good = jpeg(Image.fromarray(pics["coffee"]))
    png = io.BytesIO()
    Image.fromarray(pics["logo"]).save(png, "PNG")  # RGBA
    return {
        "good_rgb.JPEG": good,
        "cmyk.JPEG": jpeg(Image.fromarray(pics["chelsea"]).convert("CMYK")),
        "grey.JPEG": jpeg(Image.fromarray(pics["camera"])),
        "png_named.JPEG": png.getvalue(),
        "truncated.JPEG": good[: len(good) // 2],
        "empty.JPEG": b"",
        "not_an_image.JPEG": b"<html><body>404 Not Found</body></html>\n",
        "garbage_after_header.JPEG": good[:600] + bytes(range(256)) * 40,
    }


EXPECTED_BAD = {"truncated.JPEG", "empty.JPEG", "not_an_image.JPEG", "garbage_after_header.JPEG"}
EXPECTED_CONVERTED = {"cmyk.JPEG", "grey.JPEG", "png_named.JPEG"}


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory, bad_inputs) -> Path:
    """An ImageFolder tree with the bad inputs spread over two classes beside good digits."""
    root = write_imagefolder(tmp_path_factory.mktemp("messy") / "folder")
    for i, (name, data) in enumerate(sorted(bad_inputs.items())):
        (root / f"n0000000{i % 2}" / name).write_bytes(data)
    return root


@pytest.fixture(scope="session")
def messy_tars(tmp_path_factory, bad_inputs) -> Path:
    """Per-synset tars with bad members, plus one tar cut short in the middle of a member."""
    root = write_synset_tars(tmp_path_factory.mktemp("messy") / "tars")
    write_tar(root / "n00000010.tar", sorted(bad_inputs.items()))
    whole = root / "n00000011.tar"
    write_tar(whole, [(f"n00000011_{i}.JPEG", bad_inputs["good_rgb.JPEG"]) for i in range(4)])
    data = whole.read_bytes()
    whole.write_bytes(data[: 512 * 3 + len(bad_inputs["good_rgb.JPEG"]) + 100])  # inside the 2nd member
    (root / "README.txt").write_text("not a synset tar\n")
    return root
