"""One index per split (`train/index.npz`): where every sample of the split lies.

One index per split (`train/index.npz`): where every sample of the split lies, so a training rank reads one
object at start instead of one `.idx` per shard (14,200 GETs per rank per split at ImageNet-22K scale).

`finalize` builds it from the shards' DALI index files (which stay: DALI's readers and tools use them) and lists
it in manifest.json with its sha256 (`write_split_indexes`); a reader fetches it and checks it against that entry
(`read_split_index`). Columns, not Python objects, so that a rank holds about 40 bytes per sample:
per shard its name and first row; per sample the image's and cls's byte ranges inside the tar and its key (one
UTF-8 bytes blob with offsets). An npz of plain arrays loads with allow_pickle=False: nothing in it is executed.

Samples follow webdataset's rule (members.py): the key is the image member's name up to the first dot of its last
component, and the image is the first of IMAGE_EXTS a sample has (jpg, jpeg, png, webp; the columns keep the
name `jpg_*`). Version 1 has exactly these columns (what `data_prep shard` writes, byte for byte as before);
version 2 adds an int32 `label` per sample (a set indexed in place, whose labels are values, not `cls` members:
its samples then need no cls, and the reader reads no cls bytes).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .index import IndexFileError, parse_index
from .members import IMAGE_EXTS, split_member
from .store import LocalStore

VERSION = 1  # the columns below without `label`
VERSION_LABELS = 2  # with the int32 `label` column

# one shard's columns: (jpg offsets, jpg sizes, cls offsets, cls sizes, key bytes, key lengths)
ShardColumns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes, np.ndarray]


def split_index_name(split: str) -> str:
    return f"{split}/index.npz"


@dataclass(frozen=True)
class SampleTable:
    """Samples of a list of shards, shard after shard in the order of `names`."""

    names: list[str]  # shard file names ("train/shard-000000.tar")
    starts: np.ndarray  # int64 (shards + 1): row of each shard's first sample; the last is the sample count
    jpg_offset: np.ndarray  # int64 per sample: data offset of its jpg member in the tar
    jpg_size: np.ndarray  # uint32
    cls_offset: np.ndarray  # int64
    cls_size: np.ndarray  # uint16
    key_blob: np.ndarray  # uint8: every key's UTF-8 bytes, end to end
    key_starts: np.ndarray  # int64 (samples + 1)
    label: np.ndarray | None = None  # int32 per sample (version 2), or None: the labels are the cls members

    @property
    def version(self) -> int:
        return VERSION if self.label is None else VERSION_LABELS

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shard_sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def row(self, shard: int, sample: int) -> int:
        return int(self.starts[shard]) + sample

    def key(self, row: int) -> str:
        return (
            self.key_blob[self.key_starts[row] : self.key_starts[row + 1]].tobytes().decode("utf-8", "surrogateescape")
        )

    def ends(self) -> np.ndarray:
        """Per shard, the byte where its last member's data ends (checked against the tar's size)."""
        end = np.maximum(self.jpg_offset + self.jpg_size, self.cls_offset + self.cls_size)
        out = np.zeros(len(self.names), np.int64)
        nonempty = self.shard_sizes > 0
        out[nonempty] = np.maximum.reduceat(end, self.starts[:-1][nonempty]) if len(end) else 0
        return out

    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.starts,
                self.jpg_offset,
                self.jpg_size,
                self.cls_offset,
                self.cls_size,
                self.key_blob,
                self.key_starts,
                *([] if self.label is None else [self.label]),
            )
        )

    def select(self, shards: list[int]) -> SampleTable:
        """The table of these shards only (the usable ones), in this order."""

        def cat(ranges):
            pieces = [np.arange(lo, hi) for lo, hi in ranges]
            return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

        rows = cat((self.starts[s], self.starts[s + 1]) for s in shards)
        key_bytes = cat((self.key_starts[self.starts[s]], self.key_starts[self.starts[s + 1]]) for s in shards)
        sizes = self.shard_sizes[shards] if shards else np.zeros(0, np.int64)
        return SampleTable(
            [self.names[s] for s in shards],
            _cumulative(sizes),
            self.jpg_offset[rows],
            self.jpg_size[rows],
            self.cls_offset[rows],
            self.cls_size[rows],
            self.key_blob[key_bytes],
            _cumulative(np.diff(self.key_starts)[rows]),
            None if self.label is None else self.label[rows],
        )

    @classmethod
    def from_index_texts(
        cls, names: list[str], texts: list[str], labels: list[np.ndarray] | None = None
    ) -> SampleTable:
        """From the shards' DALI index files (parsed; a malformed one raises IndexFileError naming its shard), and
        with `labels` (one integer array per shard, a value per sample of its index) a version 2 table whose
        samples need no cls member."""
        parts = [_columns(name, text, need_cls=labels is None) for name, text in zip(names, texts, strict=True)]
        return cls.concat(names, parts, labels)

    @classmethod
    def concat(cls, names: list[str], parts: list[ShardColumns], labels: list[np.ndarray] | None = None) -> SampleTable:
        sizes = [len(p[0]) for p in parts]
        label = None
        if labels is not None:
            for name, size, values in zip(names, sizes, labels, strict=True):
                if values.ndim != 1 or len(values) != size or not np.issubdtype(values.dtype, np.integer):
                    raise IndexFileError(
                        f"{name}: {values.shape} {values.dtype} labels for its {size} indexed samples (needs one "
                        f"integer each)"
                    )
                if len(values) and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
                    raise IndexFileError(f"{name}: labels outside int32")
            label = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)

        def cat(i, dtype):
            return np.concatenate([p[i] for p in parts]).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        blob = b"".join(p[4] for p in parts)
        lengths = cat(5, np.int64)
        return cls(
            list(names),
            _cumulative(np.asarray(sizes, np.int64)),
            cat(0, np.int64),
            cat(1, np.uint32),
            cat(2, np.int64),
            cat(3, np.uint16),
            np.frombuffer(blob, np.uint8).copy(),
            _cumulative(lengths),
            label,
        )

    def to_bytes(self) -> bytes:
        """The index as npz bytes: the same shards give the same bytes.

        An npz that np.load reads, with fixed zip timestamps: the same shards give the same bytes (numpy's
        savez stamps the current time, which would change the manifest's sha256 on every finalize)."""
        arrays = {
            "version": np.int64(self.version),
            "names": np.array(self.names, dtype=str),
            "starts": self.starts,
            "jpg_offset": self.jpg_offset,
            "jpg_size": self.jpg_size,
            "cls_offset": self.cls_offset,
            "cls_size": self.cls_size,
            "key_blob": self.key_blob,
            "key_starts": self.key_starts,
        }
        if self.label is not None:  # version 2 only: a version 1 table's bytes are what they always were
            arrays["label"] = self.label
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with z.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SampleTable:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                version = int(z["version"])
                if version not in (VERSION, VERSION_LABELS):
                    raise ValueError(f"version {version}, expected {VERSION} or {VERSION_LABELS}")
                table = cls(
                    [str(n) for n in z["names"]],
                    z["starts"],
                    z["jpg_offset"],
                    z["jpg_size"],
                    z["cls_offset"],
                    z["cls_size"],
                    z["key_blob"],
                    z["key_starts"],
                    z["label"] if version == VERSION_LABELS else None,
                )
        except (ValueError, KeyError, OSError) as e:
            raise IndexFileError(f"{where}: not a readable split index ({e})") from None
        n = len(table)
        if (
            not all(len(a) == n for a in (table.jpg_offset, table.jpg_size, table.cls_offset, table.cls_size))
            or len(table.key_starts) != n + 1
            or len(table.starts) != len(table.names) + 1
            or (table.label is not None and (len(table.label) != n or table.label.dtype != np.int32))
        ):
            raise IndexFileError(f"{where}: split index columns of different lengths")
        return table


def _cumulative(lengths: np.ndarray) -> np.ndarray:
    """Start offsets from lengths: [0, l0, l0 + l1, ...]."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _columns(name: str, text: str, need_cls: bool = True) -> ShardColumns:
    """(image offsets, image sizes, cls offsets, cls sizes, key bytes, key lengths) of one shard's index file. The
    image is the first of IMAGE_EXTS a sample has (suffixes compared lower-cased), its key webdataset's (the image
    member's name up to the first dot of its last component). Without `need_cls` a sample may lack its cls (the
    labels come as values): its cls range is then (0, 0)."""
    try:
        samples = parse_index(text)
    except IndexFileError as e:
        raise IndexFileError(f"{name}: {e}") from None
    jpg_pairs: list[tuple[int, int]] = []  # (offset, size)
    cls_pairs: list[tuple[int, int]] = []
    keys: list[bytes] = []
    for components in samples:
        parts: dict[str, tuple[int, int, str]] = {}
        for ext, offset, size, member in components:
            parts.setdefault(ext.lower(), (offset, size, member))
        image = next((parts[ext] for ext in IMAGE_EXTS if ext in parts), None)
        first = components[0][3] if components else "?"
        if image is None:
            raise IndexFileError(f"{name}: a sample without an image ({', '.join(IMAGE_EXTS)}): {first}")
        if need_cls and "cls" not in parts:
            raise IndexFileError(f"{name}: a sample without cls ({first})")
        key = split_member(image[2])
        if key is None:
            raise IndexFileError(f"{name}: image member {image[2]!r} has no key (no dot in its file name)")
        jpg_pairs.append(image[:2])
        cls_pairs.append(parts["cls"][:2] if "cls" in parts else (0, 0))
        keys.append(key[0].encode("utf-8", "surrogateescape"))
    jpg = np.asarray(jpg_pairs, np.int64).reshape(-1, 2)
    cls_ = np.asarray(cls_pairs, np.int64).reshape(-1, 2)
    return (
        jpg[:, 0],
        jpg[:, 1],
        cls_[:, 0],
        cls_[:, 1],
        b"".join(keys),
        np.fromiter(map(len, keys), np.int64, len(keys)),
    )


def read_split_index(store, entry: dict, cache=None) -> SampleTable:
    """The split index the manifest names, checked against its sha256; IndexFileError naming it if not.

    The split index the manifest's `split_indexes` entry names, checked against its sha256; raises IndexFileError
    (naming the file) when it does not match or does not parse. On S3 it is read through `cache` when given (an
    object with `pinned(store, name, bytes)`, as the loader's node-shared cache has), so a node fetches it once."""
    where = f"{store.url}/{entry['name']}"
    if cache is not None and not isinstance(store, LocalStore):
        with cache.pinned(store, entry["name"], entry["bytes"]) as path:
            data = path.read_bytes()
    else:
        data = store.read(entry["name"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IndexFileError(f"{where} does not match the sha256 in the manifest")
    return SampleTable.from_bytes(data, where)


def read_labels(store, name: str) -> np.ndarray:
    """A shard's labels file (`.npy` of one integer per indexed sample, loaded without pickle); IndexFileError
    naming it when it is not one."""
    try:
        values = np.load(io.BytesIO(store.read(name)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexFileError(f"{store.url}/{name}: not a readable labels file ({e})") from None
    if not isinstance(values, np.ndarray) or values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise IndexFileError(f"{store.url}/{name}: not a 1-D integer array of labels")
    return values


def write_split_indexes(out, shards: list[dict], threads: int = 16) -> dict:
    """Writes one index per split from the shards' `.idx` files; the manifest's entry for them.

    Reads every shard's `.idx` (threads overlap the GETs on S3), writes one index per split, and returns the
    manifest's `split_indexes` entry: split -> {name, samples, bytes, sha256}. Where a split's shard entries name
    a `labels` file (every one of them must), its index is version 2 with their labels as a column, and its entry
    says `"label_column": true` (which makes the manifest format /2)."""
    with ThreadPoolExecutor(threads) as pool:
        texts = list(pool.map(lambda e: out.read(e["index"]).decode(), shards))
    entries = {}
    for split in sorted({e["split"] for e in shards}):
        rows = [i for i, e in enumerate(shards) if e["split"] == split]
        with_labels = [i for i in rows if shards[i].get("labels")]
        if with_labels and len(with_labels) != len(rows):
            raise IndexFileError(f"{split}: {len(with_labels)} of {len(rows)} shards name a labels file (all or none)")
        labels = None
        if with_labels:
            with ThreadPoolExecutor(threads) as pool:
                labels = list(pool.map(lambda i: read_labels(out, shards[i]["labels"]), rows))
        table = SampleTable.from_index_texts([shards[i]["name"] for i in rows], [texts[i] for i in rows], labels)
        data = table.to_bytes()
        name = split_index_name(split)
        out.write_bytes(name, data)
        entries[split] = {
            "name": name,
            "samples": len(table),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **({"label_column": True} if table.label is not None else {}),
        }
    return entries
