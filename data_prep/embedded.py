"""The embedded default dataset: real handwritten digits, as an ImageFolder tree or per-synset tars.

The embedded default dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes),
upscaled to RGB JPEGs and written the way real sources come: an ImageFolder tree or ImageNet-22K-style
per-synset tars. Synset ids are made up but well-formed: digit k is n0000000k."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def synset_of(digit: int) -> str:
    return f"n{digit:08d}"


def digit_jpegs(size: int = 64, quality: int = 90) -> list[tuple[str, str, bytes]]:
    """(synset, file name, JPEG bytes) for every image of the digits dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8))  # dark ink on white paper
        img = grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        synset = synset_of(int(label))
        out.append((synset, f"{synset}_{i:04d}.JPEG", buf.getvalue()))
    return out


def write_imagefolder(root: str | Path, size: int = 64) -> Path:
    root = Path(root)
    for synset, name, data in digit_jpegs(size):
        (root / synset).mkdir(parents=True, exist_ok=True)
        (root / synset / name).write_bytes(data)
    return root


def write_synset_tars(root: str | Path, size: int = 64) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    by_synset: dict[str, list[tuple[str, bytes]]] = {}
    for synset, name, data in digit_jpegs(size):
        by_synset.setdefault(synset, []).append((name, data))
    for synset, files in by_synset.items():
        write_tar(root / f"{synset}.tar", files)
    return root


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
