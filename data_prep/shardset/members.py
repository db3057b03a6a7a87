"""Invariant: a tar's samples are exactly the ones `webdataset.WebDataset` (1.0.2) yields for it, with the same keys
and suffixes, so an index built from these rules points at what a webdataset user of the same shards reads.

webdataset's rule (webdataset/tariterators.py: `tar_file_iterator`, `base_plus_ext`, `group_by_keys`):
- only regular files count (directories, links and the like are skipped);
- a top-level name `__...__`, and any name matching `__[^/]*__($|/)`, is metadata and skipped;
- a member's key is its path up to the first dot of its last component (keys may hold '/', and dots in folder
  names), the suffix everything after that dot, lower-cased; a name with no dot in its last component is skipped
  (precisely: `^((?:.*/|)[^.]+)[.]([^/]*)$`, which this module applies as is);
- consecutive members with one key form one sample (GNU `tar -C dir .` gives keys like `./x`, kept as they are);
- a suffix repeated inside one sample is an error there (webdataset raises); here the sample is marked bad.

Also the image rule of the shard-set contract (the first of IMAGE_EXTS a sample has is its image) and a header
sniffer for the size of a JPEG, PNG or WebP image. Pure functions over names, offsets and bytes: no I/O.
"""

from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in this order: the first a sample has is its image

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta


@dataclass(frozen=True)
class Member:
    """A tar member: its name, where its data starts in the tar and its size."""

    name: str
    offset: int
    size: int
    regular: bool = True


@dataclass
class Sample:
    """Consecutive members with one key: suffix (lower-cased) -> member, in tar order."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)
    bad: str | None = None  # why webdataset would not read it (a repeated suffix), or None

    def image(self) -> tuple[str, Member] | None:
        """(suffix, member) of its image: the first of IMAGE_EXTS it has; None when it has none."""
        return next(((ext, self.members[ext]) for ext in IMAGE_EXTS if ext in self.members), None)


def split_member(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a member name by webdataset's rule (suffix as written, not lower-cased); None when the
    name has no dot in its last component (webdataset skips it)."""
    match = _KEY.match(name)
    return None if match is None else (match.group(1), match.group(2))


def is_metadata(name: str) -> bool:
    """A name webdataset skips as metadata (`__x__` at the top, or anything matching `__[^/]*__($|/)`)."""
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name) is not None


def tar_members(tar: tarfile.TarFile) -> Iterator[Member]:
    """The members of an open tar (stream mode too), in order."""
    for info in tar:
        yield Member(info.name, info.offset_data, info.size, info.isreg())


def group_samples(members: Iterable[Member]) -> Iterator[Sample]:
    """The samples webdataset reads from these members (in tar order), bad ones included and marked."""
    current: Sample | None = None
    for m in members:
        if not m.regular or is_metadata(m.name):
            continue
        parts = split_member(m.name)
        if parts is None:
            continue
        key, suffix = parts[0], parts[1].lower()
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key)
        if suffix in current.members:
            if current.bad is None:
                current.bad = f"{m.name}: a second .{suffix} member in sample {key!r}"
            continue
        current.members[suffix] = m
    if current is not None:
        yield current


class ImageSizeError(ValueError):
    """Bytes that are not a JPEG, PNG or WebP image with a readable header."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG, PNG or WebP image from its header (nothing is decoded); ImageSizeError for any
    other bytes, or a header cut short."""
    head = bytes(data[:32])
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ImageSizeError("a PNG without its IHDR header")
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    raise ImageSizeError(f"not a JPEG, PNG or WebP image (it starts with {head[:12]!r})")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    import simplejpeg

    try:
        height, width, _colorspace, _sub = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise ImageSizeError(f"a JPEG whose header does not read: {e}") from None
    return width, height


def _webp_size(head: bytes) -> tuple[int, int]:
    chunk, body = head[12:16], head[20:32]
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":  # lossy: a VP8 key frame
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:  # lossless: 14 bits each, minus one
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(body) >= 10:  # extended: the canvas, 24 bits each, minus one
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    raise ImageSizeError(f"a WebP image with an unreadable {chunk!r} header")
