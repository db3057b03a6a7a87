"""Writes one shard: the tar, its DALI index, then its completion record (in that order, each atomically).

The record is the shard's 'done' marker: a rerun skips a shard only when its record exists, and rewrites it
otherwise, with exactly the same bytes (fixed tar metadata, deterministic content).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from .images import BadImage, prepare_image
from .plan import ShardSpec
from .sources import Item, read_item
from .wds_index import format_index


@dataclass(frozen=True)
class ImageOptions:
    resize_shorter: int | None = None
    jpeg_quality: int = 90
    validate: str = "scaled"


class _HashingWriter:
    """File wrapper that hashes what passes through and knows its position (tarfile needs tell())."""

    def __init__(self, raw):
        self.raw, self.sha, self.pos = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _read_items(store, items: tuple[Item, ...]) -> Iterator[tuple[Item, bytes | Exception]]:
    def read(item):
        try:
            return item, read_item(store, item)
        except (OSError, ValueError) as e:
            return item, e
        except Exception as e:  # botocore errors: a missing or unreadable object is a bad input, not a crash
            if type(e).__module__.startswith("botocore"):
                return item, e
            raise

    if store.seekable:
        yield from map(read, items)
    else:  # S3: overlap the per-object latency of ranged GETs
        with ThreadPoolExecutor(16) as pool:
            yield from pool.map(read, items)


def write_shard(spec: ShardSpec, source, out, labels: dict[str, int], image_opts: ImageOptions,
                progress: Callable[[int], None] = lambda n: None) -> dict:
    for name in (spec.name, spec.index_name):
        out.remove_stale_staging(name)
    staged = out.staging_path(spec.name)
    index, rejected, converted, class_counts = [], [], [], Counter()
    done = 0
    with open(staged, "wb") as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item, data in _read_items(source, spec.items):
                done += 1
                if done % 32 == 0:
                    progress(32)
                if isinstance(data, Exception):
                    rejected.append([item.path, f"unreadable: {data}"])
                    continue
                try:
                    img = prepare_image(data, image_opts.resize_shorter, image_opts.jpeg_quality,
                                        image_opts.validate)
                except BadImage as e:
                    rejected.append([item.path, str(e)])
                    continue
                if img.converted:
                    converted.append([item.path, img.converted])
                label = labels[item.synset]
                meta = {"synset": item.synset, "source": item.path, "width": img.width, "height": img.height}
                components = []
                for ext, payload in (("cls", str(label).encode()), ("jpg", img.jpg),
                                     ("json", json.dumps(meta, sort_keys=True).encode())):
                    member = _member(f"{item.key}.{ext}", len(payload))
                    header_at = tar.offset
                    tar.addfile(member, io.BytesIO(payload))
                    components.append((ext, header_at + tarfile.BLOCKSIZE, len(payload), member.name))
                index.append(components)
                class_counts[label] += 1
        size = sink.pos
    progress(done % 32)
    out.commit(staged, spec.name)
    out.write_bytes(spec.index_name, format_index(index).encode())
    record = {"name": spec.name, "index": spec.index_name, "split": spec.split, "planned": len(spec.items),
              "samples": len(index), "bytes": size, "sha256": sink.sha.hexdigest(),
              "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
              "rejected": rejected, "converted": converted}
    out.write_bytes(spec.record_name, json.dumps(record).encode())
    return record
