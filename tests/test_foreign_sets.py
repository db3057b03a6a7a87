"""The reader side of sets indexed in place (issue 35): png/webp images crop as their JPEG twins."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.data.loader import LoaderConfig
from pipeline.data.samples import BatchSource


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def test_png_and_webp_images_get_the_crops_of_their_jpeg_twin():
    cfg = LoaderConfig(shards="unused", batch_size=8, image_size=32, train=True)
    source = BatchSource(cfg, None, 0)  # type: ignore[arg-type]  (crops read only the config)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), np.uint8))
    images = [encode(picture, f) for f in ("JPEG", "PNG", "WEBP")]
    boxes = [source.crops(3, 1, [image])[0] for image in images]
    assert all(np.array_equal(b, boxes[0]) for b in boxes)
    w, h = picture.size
    x, y, bw, bh = boxes[0][0]
    assert 0 <= x and x + bw <= w and 0 <= y and y + bh <= h and bw * bh > 1  # of the true size, not 1x1
