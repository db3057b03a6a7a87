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

import json
import re
import tarfile
import tempfile
from array import array
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from typing import Literal, NamedTuple

import numpy as np
from tqdm import tqdm

from swin_common.errors import UserError

from .shardset.store import LocalStore, S3Store, UnsafePath, inside

LISTING_NAME = "_prep/listing.npz"
KINDS = ("imagefolder", "synset-tars")


class SourceError(UserError, ValueError):
    """A source folder or prefix whose layout is none this project reads."""


class Item(NamedTuple):
    key: str  # the webdataset __key__: unique, no dots or slashes
    synset: str
    path: str  # path of the image inside the source, as recorded in the shard's json
    container: str | None  # the per-synset tar holding it, or None for a plain file
    offset: int  # byte offset of the data inside the container
    size: int


class Listing:
    """The source's images as columns, sorted by (synset, name), each row's Item built on demand.

    The source's images as columns (numpy arrays and byte blobs), not one Python object each: ImageNet-22K
    lists 14.2M images, which as objects cost ~600 bytes apiece in every array task; here ~80 (bench/
    listing_memory.py). Rows are sorted by (synset, name); `item(i)` builds one row's Item when a shard needs it.
    """

    def __init__(
        self,
        kind: str,
        synsets: list[str],
        containers: list[str],
        columns: dict[str, np.ndarray],
        rejected: list[tuple[str, str]] | None = None,
        set_aside: dict[str, int] | None = None,
    ):
        self.kind, self.synsets, self.containers = kind, synsets, containers  # synsets: found, sorted
        self.syn = columns["syn"]  # int32: index into synsets
        self.cont = columns["cont"]  # int32: index into containers (the per-synset tars), -1 for a plain file
        self.offset = columns["offset"]  # int64: the data's byte offset inside its container
        self.size = columns["size"]  # int64
        self.name_blob, self.name_ends = columns["name_blob"], columns["name_ends"]  # member name / file path
        self.key_blob, self.key_ends = columns["key_blob"], columns["key_ends"]  # webdataset keys
        self.rejected = rejected or []  # (source path, reason)
        self.set_aside = set_aside or {}  # classes under --min-images-per-class: images listed

    def __len__(self) -> int:
        return len(self.syn)

    def _text(self, blob: np.ndarray, ends: np.ndarray, i: int) -> bytes:
        return blob[ends[i - 1] if i else 0 : ends[i]].tobytes()

    def path_bytes(self, i: int) -> bytes:
        """The image's path inside the source: `<tar>/<member>` or the file's relative path."""
        name = self._text(self.name_blob, self.name_ends, i)
        c = self.cont[i]
        return name if c < 0 else self.containers[c].encode() + b"/" + name

    def item(self, i: int) -> Item:
        c = int(self.cont[i])
        return Item(
            self._text(self.key_blob, self.key_ends, i).decode(),
            self.synsets[self.syn[i]],
            self.path_bytes(i).decode(),
            None if c < 0 else self.containers[c],
            int(self.offset[i]),
            int(self.size[i]),
        )

    def images_per_synset(self) -> np.ndarray:
        return np.bincount(self.syn, minlength=len(self.synsets))

    def without_synsets(self, drop: set[str], set_aside: dict[str, int]) -> Listing:
        """The listing less every image of the synsets in `drop` (recorded as set aside)."""
        keep_syn = np.array([s not in drop for s in self.synsets], bool)
        rows = np.flatnonzero(keep_syn[self.syn])
        renumber = np.cumsum(keep_syn) - 1
        columns = {
            "syn": renumber[self.syn[rows]].astype(np.int32),
            "cont": self.cont[rows],
            "offset": self.offset[rows],
            "size": self.size[rows],
        }
        for blob, ends in (("name_blob", "name_ends"), ("key_blob", "key_ends")):
            columns[blob], columns[ends] = _take_strings(getattr(self, blob), getattr(self, ends), rows)
        return Listing(
            self.kind,
            [s for s, k in zip(self.synsets, keep_syn, strict=True) if k],
            self.containers,
            columns,
            self.rejected,
            {**self.set_aside, **set_aside},
        )

    # -- the cache in the output (_prep/listing.npz): the same columns, loaded without unpickling ------------
    # Written and read through a local file in chunks, never as one bytes object: the columns are the job's
    # biggest allocation and must not be held twice.
    def save(self, out, rel: str) -> None:
        meta = json.dumps(
            {
                "version": 1,
                "kind": self.kind,
                "synsets": self.synsets,
                "containers": self.containers,
                "rejected": self.rejected,
            },
            separators=(",", ":"),
        ).encode()
        staged = out.staging_path(rel)
        with open(staged, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(meta, np.uint8),
                syn=self.syn,
                cont=self.cont,
                offset=self.offset,
                size=self.size,
                name_blob=self.name_blob,
                name_ends=self.name_ends,
                key_blob=self.key_blob,
                key_ends=self.key_ends,
            )
        out.commit(staged, rel)

    @classmethod
    def load(cls, out, rel: str) -> Listing:
        if isinstance(out, LocalStore):
            return cls._load_file(out.local_path(rel))
        with tempfile.TemporaryFile() as f:
            out.download_to(rel, f)
            f.seek(0)
            return cls._load_file(f)

    @classmethod
    def _load_file(cls, path_or_file) -> Listing:
        with np.load(path_or_file, allow_pickle=False) as z:
            columns = {k: z[k] for k in z.files}
        meta = json.loads(columns.pop("meta").tobytes())
        return cls(meta["kind"], meta["synsets"], meta["containers"], columns, [tuple(r) for r in meta["rejected"]])


class _Builder:
    """Appends rows into growing arrays (array module, bytearray): no Python object per row survives."""

    def __init__(self, synsets: list[str]):
        self.synsets = synsets
        self.syn_index = {s: i for i, s in enumerate(synsets)}
        self.containers: list[str] = []
        self.cont_index: dict[str, int] = {}
        self.syn, self.cont = array("i"), array("i")
        self.offset, self.size, self.name_ends, self.key_ends = array("q"), array("q"), array("q"), array("q")
        self.names, self.keys = bytearray(), bytearray()

    def add(self, key: str, synset: str, name: str, container: str | None, offset: int, size: int) -> None:
        self.syn.append(self.syn_index[synset])
        if container is None:
            self.cont.append(-1)
        else:
            c = self.cont_index.get(container)
            if c is None:
                c = self.cont_index[container] = len(self.containers)
                self.containers.append(container)
            self.cont.append(c)
        self.offset.append(offset)
        self.size.append(size)
        self.names += name.encode()
        self.name_ends.append(len(self.names))
        self.keys += key.encode()
        self.key_ends.append(len(self.keys))

    def build(self, kind: str, rejected: list) -> Listing:
        def arr(a, dtype):
            return np.frombuffer(a, dtype) if len(a) else np.zeros(0, dtype)

        columns = {
            "syn": arr(self.syn, np.int32),
            "cont": arr(self.cont, np.int32),
            "offset": arr(self.offset, np.int64),
            "size": arr(self.size, np.int64),
            "name_blob": arr(self.names, np.uint8),
            "name_ends": arr(self.name_ends, np.int64),
            "key_blob": arr(self.keys, np.uint8),
            "key_ends": arr(self.key_ends, np.int64),
        }
        return Listing(kind, self.synsets, self.containers, columns, rejected)


def _take_strings(blob: np.ndarray, ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    lengths = (ends - starts)[rows]
    new_ends = np.cumsum(lengths).astype(np.int64)
    if not len(rows):
        return np.zeros(0, np.uint8), new_ends
    picks = np.repeat(starts[rows] - (new_ends - lengths), lengths) + np.arange(int(new_ends[-1]))
    return blob[picks], new_ends


def detect_kind(store: LocalStore | S3Store) -> str:
    dirs, files = store.list_dir()
    tars = [f for f in files if f.endswith(".tar")]
    if tars and dirs:
        raise SourceError(
            f"{store.url} holds both folders and .tar files: pass --source-format imagefolder or synset-tars"
        )
    if tars:
        return "synset-tars"
    if dirs:
        return "imagefolder"
    raise SourceError(f"{store.url} holds neither class folders nor per-synset .tar files")


def scan_source(store: LocalStore | S3Store, kind: str = "auto", workers: int = 1) -> Listing:
    if kind == "auto":
        kind = detect_kind(store)
    if kind == "imagefolder":
        return _scan_imagefolder(store)
    if kind == "synset-tars":
        return _scan_tars(store, workers)
    raise SourceError(f"unknown source format {kind!r}; expected one of {KINDS}")


def _scan_imagefolder(store) -> Listing:
    """One class folder at a time (its files sorted), so no more than one folder's names are Python objects."""
    dirs, files = store.list_dir()
    rejected = [(f, "not inside a class folder") for f in files]
    unsafe = [d for d in dirs if d in ("", ".", "..") or "\0" in d or "/" in d]  # S3 keys like '/x' or '../x'
    rejected += [(f"{d}/", "not a class folder name; nothing under it is read") for d in unsafe]
    synsets = sorted(set(dirs) - set(unsafe))
    builder = _Builder(synsets)
    for synset in tqdm(synsets, desc="listing class folders", unit=" folders", leave=False):
        keys, entries = _KeyMaker(synset), []
        for rel, size in store.list(synset):
            try:
                inside(rel, store.url)  # an S3 key such as 'prefix/n01/../x.JPEG' or with a NUL
            except UnsafePath as e:
                rejected.append((rel, str(e)))
                continue
            entries.append((rel, size))
        for rel, size in sorted(entries):
            builder.add(keys.make(rel.split("/", 1)[1]), synset, rel, None, 0, size)
    listing = builder.build("imagefolder", sorted(rejected))
    empty = {s for s, n in zip(synsets, listing.images_per_synset().tolist(), strict=True) if n == 0}
    return listing.without_synsets(empty, {}) if empty else listing  # a class is a folder with images


def _scan_tars(store, workers: int) -> Listing:
    _dirs, files = store.list_dir()
    tars = [f for f in files if f.endswith(".tar")]
    rejected = [(f, "not a per-synset .tar") for f in files if not f.endswith(".tar")]
    synsets = sorted(t[: -len(".tar")] for t in tars)
    builder = _Builder(synsets)

    def add(tar_name, part, bad):  # one tar's members at a time: none stays a Python object
        synset = tar_name[: -len(".tar")]
        for key, name, offset, size in part:
            builder.add(key, synset, name, tar_name, offset, size)
        rejected.extend(bad)

    ordered = sorted(tars)
    with tqdm(total=len(tars), desc="listing synset tars", unit=" tars", leave=False) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for tar_name, (part, bad) in zip(
                    ordered, pool.map(_scan_one_tar, [store] * len(tars), ordered, chunksize=8), strict=True
                ):
                    add(tar_name, part, bad)
                    bar.update()
        else:
            for tar_name in ordered:
                add(tar_name, *_scan_one_tar(store, tar_name))
                bar.update()
    return builder.build("synset-tars", sorted(rejected))


def _scan_one_tar(store, tar_name: str) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str]]]:
    """Members of one per-synset tar: headers only on a local disk (seeks), one streamed read on S3."""
    synset = tar_name[: -len(".tar")]
    members: list[tuple[str, int, int]] = []
    rejected: list[tuple[str, str]] = []
    try:
        with closing(store.open_read(tar_name)) as fileobj:
            mode: Literal["r:", "r|"] = "r:" if store.seekable else "r|"
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
    return [(keys.make(name), name, off, size) for name, off, size in sorted(members)], rejected


class _KeyMaker:
    """Webdataset keys made from file names: prefixed with the synset, free of dots.

    Webdataset keys from file names: '<synset>_<stem>' (or '<stem>' when it already starts with the
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
