"""Lists a source into items (one per input image) and reads an item's bytes.

Two source layouts, local or on S3:
  imagefolder  <root>/<synset>/<any/depth/file>
  synset-tars  <root>/<synset>.tar, each holding that synset's images; read in place (seek or ranged GET),
               never extracted.

Names from the source never become paths: an item's key keeps only [A-Za-z0-9_-] of its file name (a tar
member `../../etc/x.JPEG` gets the key `<synset>_______etc_x`), the member's name is only recorded as the
sample's "source", and a listed path that would leave the source (`..`, absolute, NUL) is rejected.
"""
from __future__ import annotations

import gzip
import json
import re
import tarfile
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from tqdm import tqdm

from .shardset.store import LocalStore, S3Store, UnsafePath, inside

LISTING_NAME = "_prep/listing.json.gz"
KINDS = ("imagefolder", "synset-tars")


class Item(NamedTuple):
    key: str  # the webdataset __key__: unique, no dots or slashes
    synset: str
    path: str  # path of the image inside the source, as recorded in the shard's json
    container: str | None  # the per-synset tar holding it, or None for a plain file
    offset: int  # byte offset of the data inside the container
    size: int


@dataclass
class Listing:
    kind: str
    synsets: list[str]  # every synset found in the source, sorted
    items: list[Item]  # sorted by (synset, path)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    set_aside: dict[str, int] = field(default_factory=dict)  # classes under --min-images-per-class: images

    def to_json(self) -> bytes:
        doc = {"kind": self.kind, "synsets": self.synsets, "items": [list(i) for i in self.items],
               "rejected": [list(r) for r in self.rejected]}
        return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=1, mtime=0)

    @classmethod
    def from_json(cls, data: bytes) -> "Listing":
        doc = json.loads(gzip.decompress(data))
        # one string object per synset and per tar, not one per image: ImageNet-22K lists 14M items
        shared: dict[str, str] = {}
        items = [Item(key, shared.setdefault(synset, synset), path,
                      container if container is None else shared.setdefault(container, container), offset, size)
                 for key, synset, path, container, offset, size in doc["items"]]
        return cls(doc["kind"], doc["synsets"], items, [tuple(r) for r in doc["rejected"]])


def detect_kind(store: LocalStore | S3Store) -> str:
    dirs, files = store.list_dir()
    tars = [f for f in files if f.endswith(".tar")]
    if tars and dirs:
        raise ValueError(f"{store.url} holds both folders and .tar files: pass --source-format "
                         f"imagefolder or synset-tars")
    if tars:
        return "synset-tars"
    if dirs:
        return "imagefolder"
    raise ValueError(f"{store.url} holds neither class folders nor per-synset .tar files")


def scan_source(store: LocalStore | S3Store, kind: str = "auto", workers: int = 1) -> Listing:
    if kind == "auto":
        kind = detect_kind(store)
    if kind == "imagefolder":
        return _scan_imagefolder(store)
    if kind == "synset-tars":
        return _scan_tars(store, workers)
    raise ValueError(f"unknown source format {kind!r}; expected one of {KINDS}")


def _scan_imagefolder(store) -> Listing:
    by_synset: dict[str, list[tuple[str, int]]] = {}
    rejected = []
    for rel, size in tqdm(store.list(), desc="listing files", unit=" files", leave=False):
        try:
            inside(rel, store.url)  # an S3 key such as 'prefix/n01/../x.JPEG' or with a NUL
        except UnsafePath as e:
            rejected.append((rel, str(e)))
            continue
        synset, sep, _rest = rel.partition("/")
        if not sep:
            rejected.append((rel, "not inside a class folder"))
            continue
        by_synset.setdefault(synset, []).append((rel, size))
    items = []
    for synset in sorted(by_synset):
        keys = _KeyMaker(synset)
        for rel, size in sorted(by_synset[synset]):
            items.append(Item(keys.make(rel.split("/", 1)[1]), synset, rel, None, 0, size))
    return Listing("imagefolder", sorted(by_synset), items, sorted(rejected))


def _scan_tars(store, workers: int) -> Listing:
    _dirs, files = store.list_dir()
    tars = [f for f in files if f.endswith(".tar")]
    rejected = [(f, "not a per-synset .tar") for f in files if not f.endswith(".tar")]
    items = []
    with tqdm(total=len(tars), desc="listing synset tars", unit=" tars", leave=False) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_scan_one_tar, [store] * len(tars), tars, chunksize=8)
                for part, bad in results:
                    items += part
                    rejected += bad
                    bar.update()
        else:
            for tar_name in tars:
                part, bad = _scan_one_tar(store, tar_name)
                items += part
                rejected += bad
                bar.update()
    synsets = sorted(t[: -len(".tar")] for t in tars)
    return Listing("synset-tars", synsets, items, sorted(rejected))


def _scan_one_tar(store, tar_name: str) -> tuple[list[Item], list[tuple[str, str]]]:
    """Members of one per-synset tar: headers only on a local disk (seeks), one streamed read on S3."""
    synset = tar_name[: -len(".tar")]
    members, rejected = [], []
    try:
        with closing(store.open_read(tar_name)) as fileobj:
            mode = "r:" if store.seekable else "r|"
            with tarfile.open(fileobj=fileobj, mode=mode) as tf:
                for m in tf:
                    if m.isdir():
                        continue
                    if not m.isfile():
                        rejected.append((f"{tar_name}/{m.name}", "not a regular file in the tar"))
                        continue
                    members.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as e:
        rejected.append((tar_name, f"corrupt tar: read {len(members)} member(s), then: {e}"))
    keys = _KeyMaker(synset)
    items = [Item(keys.make(name), synset, f"{tar_name}/{name}", tar_name, off, size)
             for name, off, size in sorted(members)]
    return items, rejected


class _KeyMaker:
    """Webdataset keys from file names: '<synset>_<stem>' (or '<stem>' when it already starts with the
    synset), with anything but [A-Za-z0-9_-] replaced, since a dot would split key from extension."""

    _unsafe = re.compile(r"[^A-Za-z0-9_-]")

    def __init__(self, synset: str):
        self.synset = self._unsafe.sub("_", synset)
        self.used: set[str] = set()

    def make(self, relpath: str) -> str:
        stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
        stem = self._unsafe.sub("_", stem)
        key = stem if stem.startswith(self.synset) else f"{self.synset}_{stem}"
        key = key[:80]  # keeps every tar member name within ustar's 100 characters
        base, n = key, 1
        while key in self.used:
            n += 1
            key = f"{base[:74]}_{n}"
        self.used.add(key)
        return key


def item_request(item: Item) -> tuple[str, int, int | None]:
    """What to read for an item: a whole file, or its byte range inside a per-synset tar."""
    if item.container is None:
        return item.path, 0, None
    return item.container, item.offset, item.size


def check_item_bytes(item: Item, data: bytes) -> None:
    """A tar cut short yields fewer bytes than its header promised: that member is truncated."""
    if item.container is not None and len(data) != item.size:
        raise OSError(f"truncated in the tar: {len(data)} of {item.size} bytes")
