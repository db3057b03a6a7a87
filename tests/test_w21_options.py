"""timm's ImageNet-22K (w21) data choices as prep options: --min-size, EXIF handling, --min-images-per-class."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import run_prep
from data_prep.images import BadImage, metadata_segments, prepare_image
from pipeline.data.loader import LoaderConfig, create_loader

ORIENTATION = 0x0112


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Asymmetric content (a bright left band, a gradient): a rotation shows in every crop."""
    rng = np.random.default_rng(seed)
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :, 1] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
    a[:, : width // 4] = 255
    a[: height // 5, :, 2] = rng.integers(100, 255)
    return Image.fromarray(a)


def jpeg(img: Image.Image, orientation: int | None = None, xmp: bool = False) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    if xmp:
        kw["xmp"] = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'></x:xmpmeta>"
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_min_size_rejects_images_with_a_short_side_under_it():
    with pytest.raises(BadImage, match="20x40: shorter side under --min-size 32 px"):
        prepare_image(jpeg(picture(20, 40)), min_size=32)
    png = io.BytesIO()
    picture(40, 30).save(png, "PNG")
    with pytest.raises(BadImage, match="40x30"):
        prepare_image(png.getvalue(), min_size=32)  # a converted input is measured too
    assert prepare_image(jpeg(picture(32, 40)), min_size=32).width == 32


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_apply_stores_the_image_upright_without_metadata(orientation):
    original = jpeg(picture(100, 60), orientation)
    out = prepare_image(original)  # the default: apply
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(original)))
    assert out.converted == "EXIF orientation applied" and (out.width, out.height) == upright.size
    assert not metadata_segments(out.jpg)
    stored = np.asarray(Image.open(io.BytesIO(out.jpg)).convert("RGB"), np.float32)
    assert np.abs(stored - np.asarray(upright.convert("RGB"), np.float32)).mean() < 3


def test_exif_strip_and_keep():
    rotated = jpeg(picture(100, 60), 6, xmp=True)
    assert len(metadata_segments(rotated)) == 2  # EXIF and XMP
    stripped = prepare_image(rotated, exif="strip")
    assert (stripped.width, stripped.height) == (100, 60) and not metadata_segments(stripped.jpg)
    assert stripped.converted == "non-colour metadata stripped"
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(stripped.jpg))), np.asarray(Image.open(io.BytesIO(rotated)))
    )  # lossless: the same pixels
    assert prepare_image(rotated, exif="keep").jpg == rotated
    upright_with_exif = jpeg(picture(100, 60), 1)
    out = prepare_image(upright_with_exif)  # nothing to rotate: the metadata is cut, the pixels stay
    assert out.converted == "non-colour metadata stripped" and not metadata_segments(out.jpg)
    plain = jpeg(picture(100, 60))
    assert prepare_image(plain).jpg == plain and prepare_image(plain).converted is None


@pytest.fixture(scope="module")
def rotated_folder(tmp_path_factory) -> Path:
    """Two classes of EXIF-rotated photos (orientations 6, 8, 3), one too small for --min-size 32."""
    root = tmp_path_factory.mktemp("exif") / "src"
    for c in range(2):
        folder = root / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i, orientation in enumerate([6, 8, 3, 6]):
            (folder / f"n0000000{c}_{i}.JPEG").write_bytes(jpeg(picture(120, 72, seed=c * 10 + i), orientation))
    (root / "n00000001" / "n00000001_small.JPEG").write_bytes(jpeg(picture(24, 30)))
    return root


def eval_batches(shards: Path, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = LoaderConfig(
        shards=str(shards),
        train=False,
        batch_size=8,
        image_size=48,
        backend=backend,
        workers=1 if backend == "dali" else 0,
    )
    xs, ys = zip(*create_loader(cfg), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_with_exif_applied_dali_and_torch_see_the_same_pixels(rotated_folder, tmp_path):
    applied, kept = tmp_path / "applied", tmp_path / "kept"
    run_prep("shard", "--source", rotated_folder, "--out", applied, "--min-size", 32)
    run_prep("shard", "--source", rotated_folder, "--out", kept, "--exif", "keep", "--min-size", 32)
    manifest = json.loads((applied / "manifest.json").read_text())
    assert manifest["options"]["exif"] == "apply" and manifest["options"]["min_size"] == 32  # declared
    assert manifest["converted"] == {"EXIF orientation applied": 8}
    assert [r["source"] for r in manifest["rejected"]] == ["n00000001/n00000001_small.JPEG"]
    assert "shorter side under --min-size 32" in manifest["rejected"][0]["reason"]

    (xt, yt), (xd, yd) = eval_batches(applied, "torch"), eval_batches(applied, "dali")
    assert torch.equal(yt, yd) and len(yt) == 8
    assert (xt - xd).abs().mean() < 0.05  # the decoders and resizers differ slightly, the pixels do not
    # as the bytes came (EXIF kept): DALI rotates, PIL does not, and the two backends see different images
    (kt, _), (kd, _) = eval_batches(kept, "torch"), eval_batches(kept, "dali")
    assert (kt - kd).abs().mean() > 0.3


def test_min_images_per_class_sets_small_classes_aside(digits_folder, tmp_path):
    src = tmp_path / "src"
    for folder in sorted(Path(digits_folder).iterdir())[:3]:
        keep = 5 if folder.name.endswith("2") else 40  # class 2 has only 5 images
        (src / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:keep]:
            (src / folder.name / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    run_prep("shard", "--source", src, "--out", out, "--min-images-per-class", 10)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["set_aside_classes"] == {"n00000002": 5}
    assert manifest["label_layout"]["synsets"] == ["n00000000", "n00000001"]
    assert (out / "synsets.txt").read_text().split() == ["n00000000", "n00000001"]
    assert manifest["totals"]["train"]["samples"] == 80 and manifest["options"]["min_images_per_class"] == 10
