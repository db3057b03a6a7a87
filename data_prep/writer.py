"""Writes one shard: the tar, its DALI index, then its completion record (in that order, each atomically).

Split in two so a worker process can go on encoding the next shard while its parent commits this one.

The record is the shard's 'done' marker: a rerun skips a shard only when its record exists, and rewrites it
otherwise, with exactly the same bytes (fixed tar metadata, deterministic content).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path

from .images import BadImage, PreparedImage, prepare_image
from .plan import ShardSpec
from .shardset.index import format_index
from .sources import Item, check_item_bytes, item_request


@dataclass(frozen=True)
class ImageOptions:
    resize_shorter: int | None = None
    jpeg_quality: int = 90
    validate: str = "scaled"
    min_size: int | None = None  # shorter side under it: rejected
    exif: str = "apply"  # images.EXIF_MODES


BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def _padding_to_record(size: int) -> bytes:
    """tar archives end padded to a whole record of 20 blocks, as GNU tar and tarfile write them."""
    return b"\0" * (-size % (20 * BLOCK))


_USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247  # type, link, magic, owners, devs, prefix
_USTAR_FIXED = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
_USTAR_MTIME = b"00000000000\0"
# the checksum counts its own field as eight spaces; everything but name and size is the same for all members
_USTAR_FIXED_SUM = sum(_USTAR_FIXED) + sum(_USTAR_MTIME) + sum(_USTAR_TAIL) + 8 * 32


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file with fixed metadata, as tarfile writes it.

    The 512-byte ustar header tarfile writes for a regular file with fixed metadata (mode 0444, uid/gid 0,
    mtime 0, no owner names); built directly since tarfile's generic path costs more than the JPEG check."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"member name longer than 100 characters: {name}")
    size_field = b"%011o\0" % size
    checksum = _USTAR_FIXED_SUM + sum(encoded) + sum(size_field)
    return encoded.ljust(100, b"\0") + _USTAR_FIXED + size_field + _USTAR_MTIME + b"%06o\0 " % checksum + _USTAR_TAIL


def sample_json(synset: str, source: str, width: int, height: int) -> bytes:
    """The sample's json member: exactly json.dumps(meta, sort_keys=True), without its generic path's cost."""
    return b'{"height": %d, "source": %s, "synset": %s, "width": %d}' % (
        height,
        _json_str(source).encode(),
        _json_str(synset).encode(),
        width,
    )


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _read_items(store, items: tuple[Item, ...]) -> Iterator[tuple[Item, bytes | Exception]]:
    for item, data in zip(items, store.read_many(map(item_request, items)), strict=True):
        if not isinstance(data, Exception):
            try:
                check_item_bytes(item, data)
            except OSError as e:
                data = e
        yield item, data


def _prepare(data: bytes | Exception, opts: ImageOptions) -> PreparedImage | Exception:
    """The prepared image, or why the input cannot be one (a read error or BadImage)."""
    if isinstance(data, Exception):
        return data
    try:
        return prepare_image(data, opts.resize_shorter, opts.jpeg_quality, opts.validate, opts.min_size, opts.exif)
    except BadImage as e:
        return e


def _prepare_batch(datas: tuple, opts: ImageOptions) -> list[PreparedImage | Exception]:
    return [_prepare(data, opts) for data in datas]


def _prepare_many(
    pairs: Iterator[tuple[Item, bytes | Exception]], opts: ImageOptions, threads: int, batch: int = 16, ahead: int = 4
) -> Iterator[tuple[Item, PreparedImage | Exception]]:
    """Each item with its prepared image or its error, in input order.

    (item, prepared image or error) in input order. With threads > 1 the checks run on a thread pool
    (libjpeg-turbo and Pillow release the GIL) in batches of `batch` images, `ahead` batches in flight, so the
    caller's reading, hashing and writing overlap the decoding, and a worker alone at the end of the job can
    still use idle cores."""
    if threads <= 1:
        for item, data in pairs:
            yield item, _prepare(data, opts)
        return
    # a pool per shard: thread start-up is negligible next to a shard, and nothing crosses a fork
    with ThreadPoolExecutor(threads) as pool:
        in_flight: deque = deque()
        while chunk := list(islice(pairs, batch)):
            items, datas = zip(*chunk, strict=True)
            in_flight.append((items, pool.submit(_prepare_batch, datas, opts)))
            if len(in_flight) >= ahead:
                items, fut = in_flight.popleft()
                yield from zip(items, fut.result(), strict=True)
        while in_flight:
            items, fut = in_flight.popleft()
            yield from zip(items, fut.result(), strict=True)


@dataclass
class EncodedShard:
    """A shard written to its staging file, not yet visible under its name."""

    spec: ShardSpec
    staged: Path
    index_text: str
    record: dict


def encode_shard(
    spec: ShardSpec,
    source,
    out,
    labels: dict[str, int],
    image_opts: ImageOptions,
    progress: Callable[[int], None] = lambda n: None,
    threads: int = 1,
) -> EncodedShard:
    """The shard's images read, checked and packed into its staging file.

    Reads, checks and packs the shard's images into its staging file (the CPU-bound part), checking images
    on `threads` threads."""
    # a killed run may have left any of the three half-written (the record too: it is staged, then renamed)
    for name in (spec.name, spec.index_name, spec.record_name):
        out.remove_stale_staging(name)
    staged = out.staging_path(spec.name)
    index: list[list[tuple[str, int, int, str]]] = []  # per sample: (ext, data offset, size, member name)
    rejected: list[list[str]] = []  # [source path, reason]
    converted: list[list[str]] = []  # [source path, why re-encoded]
    class_counts: Counter[int] = Counter()  # label -> samples
    done = 0
    with open(staged, "wb") as raw:
        sha, size = hashlib.sha256(), 0
        for item, img in _prepare_many(_read_items(source, spec.items), image_opts, threads):
            done += 1
            if done % 32 == 0:
                progress(32)
            if isinstance(img, Exception):
                rejected.append([item.path, str(img) if isinstance(img, BadImage) else f"unreadable: {img}"])
                continue
            if img.converted:
                converted.append([item.path, img.converted])
            label = labels[item.synset]
            chunks: list[bytes] = []
            components: list[tuple[str, int, int, str]] = []
            for ext, payload in (
                ("cls", str(label).encode()),
                ("jpg", img.jpg),
                ("json", sample_json(item.synset, item.path, img.width, img.height)),
            ):
                name = f"{item.key}.{ext}"
                components.append((ext, size + BLOCK, len(payload), name))
                chunks += (ustar_header(name, len(payload)), payload, _padding(len(payload)))
                size += BLOCK + len(payload) + len(chunks[-1])
            sample = b"".join(chunks)
            raw.write(sample)
            sha.update(sample)
            index.append(components)
            class_counts[label] += 1
        end = _END_OF_ARCHIVE + _padding_to_record(size + len(_END_OF_ARCHIVE))
        raw.write(end)
        sha.update(end)
        size += len(end)
    progress(done % 32)
    record = {
        "name": spec.name,
        "index": spec.index_name,
        "split": spec.split,
        "planned": len(spec),
        "samples": len(index),
        "bytes": size,
        "sha256": sha.hexdigest(),
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "rejected": rejected,
        "converted": converted,
    }
    return EncodedShard(spec, staged, format_index(index), record)


def commit_shard(out, encoded: EncodedShard) -> dict:
    """Makes the shard visible (I/O-bound: fsync + rename, or the S3 upload), then its index, then its record."""
    spec = encoded.spec
    out.commit(encoded.staged, spec.name)
    out.write_bytes(spec.index_name, encoded.index_text.encode())  # before the record: DALI needs it
    # the record is written last; if a crash loses it, the shard is only rewritten, so no fsync needed
    out.write_bytes(spec.record_name, json.dumps(encoded.record).encode(), durable=False)
    return encoded.record
