"""Checks one input image and turns it into what a shard holds: RGB JPEG bytes.

DALI cannot skip an undecodable sample at read time (the first one stops the training pipeline), so every image
is decoded here once. A baseline RGB JPEG keeps its original bytes; anything else that can be read (greyscale or
CMYK JPEG, PNG/GIF/... under a .JPEG name) is converted to RGB JPEG; what cannot be read raises BadImage with a
reason that ends up in the manifest.

Metadata that changes pixels for some decoders only: an EXIF orientation is applied by DALI's decoders and by
PIL's `exif_transpose`, not by `Image.open` nor libjpeg. With `exif="apply"` (the default) a JPEG whose EXIF
asks for a rotation or flip is re-encoded upright, and the non-colour metadata segments (APP1: EXIF, XMP;
APP13: IPTC) of every JPEG are cut out losslessly, so every decoder sees the same pixels; `"strip"` only cuts
them (pixels as stored); `"keep"` leaves the bytes alone. Colour segments (JFIF, ICC profiles, Adobe) stay.
Images whose shorter side is under `min_size` are refused (timm's ImageNet-22K w21 set drops those under 32).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import simplejpeg
from PIL import Image, ImageOps

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


EXIF_MODES = ("apply", "strip", "keep")
_ORIENTATION = 0x0112


def prepare_image(
    data: bytes,
    resize_shorter: int | None = None,
    quality: int = 90,
    validate: str = "scaled",
    min_size: int | None = None,
    exif: str = "apply",
) -> PreparedImage:
    """The image checked and as the shard stores it (oriented, stripped, resized); BadImage when it is unusable.

    validate='scaled' decodes every entropy-coded block of a JPEG with libjpeg-turbo's DCT scaling (1/8
    size), which is where truncation and corrupt data show up, and raises on libjpeg's recoverable warnings
    as well; 'full' decodes at full size."""
    if not data:
        raise BadImage("empty file")
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise BadImage(f"corrupt JPEG header: {e}") from None
        _check_size(width, height, min_size)
        stripped = None
        if exif != "keep" and (spans := metadata_segments(data)):
            if exif == "apply" and _orientation(data) not in (None, 1):
                return _reencode(data, resize_shorter, quality, "EXIF orientation applied", min_size, exif)
            data, stripped = _cut(data, spans), "non-colour metadata stripped"
        needs_resize = resize_shorter is not None and min(width, height) > resize_shorter
        if colorspace == "YCbCr" and not needs_resize:
            try:
                if validate == "full":
                    simplejpeg.decode_jpeg(data, strict=True)
                else:  # GRAY skips colour conversion; the chroma data is still entropy-decoded and checked
                    simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, min_height=1, min_width=1)
            except ValueError as e:
                raise BadImage(f"corrupt JPEG data: {e}") from None
            return PreparedImage(data, width, height, stripped)
        reason = "resized" if needs_resize and colorspace == "YCbCr" else f"{colorspace} JPEG to RGB"
        return _reencode(data, resize_shorter, quality, reason, min_size, exif)
    return _reencode(data, resize_shorter, quality, None, min_size, exif)


def _check_size(width: int, height: int, min_size: int | None) -> None:
    if min_size and min(width, height) < min_size:
        raise BadImage(f"{width}x{height}: shorter side under --min-size {min_size} px")


def metadata_segments(jpeg: bytes) -> list[tuple[int, int]]:
    """(start, end) of the APP1 (EXIF, XMP) and APP13 (IPTC) segments before the first scan."""
    spans, i = [], 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: no metadata after it that a decoder reads
            break
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker in (0xE1, 0xED):
            spans.append((i, i + 2 + length))
        i += 2 + length
    return spans


def _cut(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out, last = [], 0
    for start, end in spans:
        out.append(data[last:start])
        last = end
    out.append(data[last:])
    return b"".join(out)


def _orientation(data: bytes) -> int | None:
    try:
        return Image.open(io.BytesIO(data)).getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001  (unreadable EXIF: nothing a decoder would apply either; the segment is cut anyway)
        return None


def _reencode(
    data: bytes,
    resize_shorter: int | None,
    quality: int,
    reason: str | None,
    min_size: int | None = None,
    exif: str = "apply",
) -> PreparedImage:
    try:
        img: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile; exif_transpose below gives a plain Image
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
    if exif == "apply" and img.getexif().get(_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
        if "EXIF" not in reason:
            reason += ", EXIF orientation applied"
    _check_size(*img.size, min_size)
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
