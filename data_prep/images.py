"""Checks one input image and turns it into what a shard holds: RGB JPEG bytes.

DALI cannot skip an undecodable sample at read time (the first one stops the training pipeline), so every image
is decoded here once. A baseline RGB JPEG keeps its original bytes; anything else that can be read (greyscale or
CMYK JPEG, PNG/GIF/... under a .JPEG name) is converted to RGB JPEG; what cannot be read raises BadImage with a
reason that ends up in the manifest.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import simplejpeg
from PIL import Image

# ImageNet-22K holds a few very large images; refuse only absurd ones (PIL's default also warns at 89M).
Image.MAX_IMAGE_PIXELS = 400_000_000

JPEG_MAGIC = b"\xff\xd8\xff"


class BadImage(Exception):
    """An input that cannot become a training sample; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class PreparedImage:
    jpg: bytes
    width: int
    height: int
    converted: str | None  # why the bytes were re-encoded, None when they are the original ones


def prepare_image(data: bytes, resize_shorter: int | None = None, quality: int = 90,
                  validate: str = "scaled") -> PreparedImage:
    """validate='scaled' decodes every entropy-coded block of a JPEG with libjpeg-turbo's DCT scaling (1/8
    size), which is where truncation and corrupt data show up, and raises on libjpeg's recoverable warnings
    as well; 'full' decodes at full size."""
    if not data:
        raise BadImage("empty file")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise BadImage(f"corrupt JPEG header: {e}") from None
        needs_resize = resize_shorter is not None and min(width, height) > resize_shorter
        if colorspace == "YCbCr" and not needs_resize:
            try:
                if validate == "full":
                    simplejpeg.decode_jpeg(data, strict=True)
                else:  # GRAY skips colour conversion; the chroma data is still entropy-decoded and checked
                    simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, min_height=1, min_width=1)
            except ValueError as e:
                raise BadImage(f"corrupt JPEG data: {e}") from None
            return PreparedImage(data, width, height, None)
        reason = "resized" if needs_resize and colorspace == "YCbCr" else f"{colorspace} JPEG to RGB"
        return _reencode(data, resize_shorter, quality, reason)
    return _reencode(data, resize_shorter, quality, None)


def _reencode(data: bytes, resize_shorter: int | None, quality: int, reason: str | None) -> PreparedImage:
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if resize_shorter is not None and fmt == "JPEG":
            img.draft("RGB", _scaled((img.width, img.height), resize_shorter))  # decode at a reduced scale
        img.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"undecodable {fmt_or(img_format(data))}: {e}") from None
    if reason is None:
        reason = f"{fmt} ({img.mode}) to RGB JPEG"
    rgb = img.convert("RGB")
    if resize_shorter is not None and min(rgb.size) > resize_shorter:
        rgb = rgb.resize(_scaled(rgb.size, resize_shorter), Image.Resampling.BICUBIC)
        if "resized" not in reason:
            reason += ", resized"
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    return PreparedImage(out.getvalue(), rgb.width, rgb.height, reason)


def _scaled(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    w, h = size
    if w <= h:
        return shorter, max(1, round(h * shorter / w))
    return max(1, round(w * shorter / h)), shorter


def img_format(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(b"\x89PNG"):
        return "PNG"
    if data[:4] in (b"GIF8",):
        return "GIF"
    return None


def fmt_or(fmt: str | None) -> str:
    return f"{fmt} image" if fmt else "image"
