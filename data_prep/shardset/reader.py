"""A shard set opened for reading one split, every shard checked before any pipeline starts.

A shard set opened for reading one split: the manifest's shards of that split, each checked cheaply before any
pipeline starts, so a truncated or mismatched shard never reaches DALI (which cannot skip a bad sample, and
segfaults on an index entry that points past the end of its tar).

Where the samples lie comes from the split's one consolidated index (`train/index.npz`, listed with its sha256 in
the manifest; one GET instead of one per shard, about 14,200 at 22K scale). A set whose manifest lists no split
index for the split is refused, naming `python -m data_prep finalize SET`, which writes it. A damaged split index
(prep's problem, not the job's) is warned about, and every shard's own `.idx` file is read instead.

Checks per shard, without reading it: listed in the manifest, present on storage with the manifest's size, index
entries with the manifest's sample count that give every sample its jpg and cls and point only inside the tar
(offset + size <= file size). A bad shard is left out with a warning, up to the caller's budget; past it, an
error names the shards and the `data_prep verify` command to run. The result holds the sample table the readers
use (numpy arrays, not Python objects: `bench/shardset_scale.py` measures its bytes per sample).

Two stores: the index store (the set's URL: manifest, split index, `.idx` and labels files) and the data store
(the shards' bytes). They are one unless the manifest (format /2) names `shards_root`, an absolute folder or an
s3:// prefix the shard names are relative to (a set indexed in place, its index written elsewhere). Everything
that reads shard bytes (sizes here; the node cache, the read-ahead and the readers) reads them from the data store
(`ShardSet.store`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from swin_common.errors import UserError

from .index import IndexFileError, format_index, parse_index
from .manifest import MANIFEST_NAME, read_manifest
from .members import IMAGE_EXTS
from .split_index import SampleTable, read_labels, read_split_index
from .store import LocalStore, S3Store, open_store

log = logging.getLogger(__name__)


class ShardSetError(UserError, RuntimeError):
    """A shard set that cannot be read as asked: no such split, no split index, too many bad shards."""


@dataclass(frozen=True)
class Shard:
    name: str  # "train/shard-000000.tar", relative to the data store (the set, or its shards_root)
    index_name: str  # relative to the set (the index store)
    samples: int
    bytes: int
    sha256: str
    labels: str | None = None  # its labels file in the index store (a set indexed in place), or None


@dataclass
class ShardSet:
    """The usable shards of one split and where their samples lie (`table`); their bytes are read through one
    store client (`store`, the data store: the set's own, or its shards_root's)."""

    url: str  # the set: where its manifest and indexes are
    split: str
    synsets: list[str]
    shards: list[Shard]  # the usable ones, in manifest order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard, why it was left out)
    table: SampleTable | None = None  # where the usable shards' samples lie, shard after shard
    store: LocalStore | S3Store | None = field(default=None, repr=False, compare=False)  # read through (one client)

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def data_url(self) -> str:
        """Where the shards' bytes are: the set's URL, or its shards_root."""
        return self.store.url if self.store is not None else self.url


def check_index(text: str, shard: Shard, file_size: int, need_cls: bool = True) -> str | None:
    """Why a shard's own `.idx` cannot be trusted for this shard, or None: every sample needs an image (one of
    IMAGE_EXTS) and, unless its labels come as values (`need_cls` False), a cls member."""
    try:
        samples = parse_index(text)
    except IndexFileError as e:
        return f"index file unreadable: {e}"
    if len(samples) != shard.samples:
        return f"index lists {len(samples)} samples, the manifest {shard.samples}"
    for n, components in enumerate(samples):
        exts = {ext.lower() for ext, _o, _s, _name in components}
        lacks = ([] if exts & set(IMAGE_EXTS) else ["an image (" + "|".join(IMAGE_EXTS) + ")"]) + (
            ["cls"] if need_cls and "cls" not in exts else []
        )
        if lacks:
            return f"sample {n} ({components[0][3] if components else '?'}) lacks {' and '.join(lacks)}"
        for _ext, offset, size, name in components:
            if offset < 0 or size < 0 or offset + size > file_size:
                return f"index entry {name} ends at byte {offset + size}, past the tar's {file_size} bytes"
    return None


def split_entries(manifest: dict, url: str, split: str) -> tuple[list[dict], dict]:
    """The shard entries and the split index entry of `split`; ShardSetError when either is missing.

    The manifest's shard entries of `split` and its split index entry; ShardSetError naming the set when the
    split has no shards or no split index (nothing but the manifest is read: the launch check calls it too)."""
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if not entries:
        raise ShardSetError(f"{url} has no {split!r} shards (splits: {sorted(manifest['totals'])})")
    entry = manifest.get("split_indexes", {}).get(split)
    if entry is None:
        raise ShardSetError(
            f"{url} has no split index for its {split!r} shards (no `split_indexes` entry in its "
            f"manifest.json): `python -m data_prep finalize {url}` writes it"
        )
    return entries, entry


def data_store(manifest: dict, index: LocalStore | S3Store) -> LocalStore | S3Store:
    """The store of the shards' bytes: `index` itself, or the manifest's shards_root (an absolute folder or an
    s3:// prefix; ShardSetError naming the manifest for anything else)."""
    root = manifest.get("shards_root")
    if root is None:
        return index
    if not isinstance(root, str) or not (root.startswith("s3://") or os.path.isabs(root)):
        raise ShardSetError(
            f"{index.url}/{MANIFEST_NAME}: shards_root {root!r} is neither an absolute folder nor an s3:// URL"
        )
    data = open_store(root)
    return index if data.url == index.url else data


def open_shard_set(url: str, split: str = "train", max_bad_shards: int = 0, cache=None) -> ShardSet:
    """The split's usable shards and where their samples lie, or ShardSetError saying why not.

    The split's usable shards and where their samples lie; raises ShardSetError when the split has no shards or
    no split index (`split_indexes` in the manifest), or when more than max_bad_shards are bad or none is left.
    On S3 the split index is fetched through `cache` (see read_split_index), once per node."""
    index = open_store(url)
    manifest = read_manifest(index)
    data = data_store(manifest, index)
    synsets = manifest["label_layout"]["synsets"]
    entries, entry = split_entries(manifest, url, split)
    shards = [Shard(e["name"], e["index"], e["samples"], e["bytes"], e["sha256"], e.get("labels")) for e in entries]
    # one listing, not a request per shard: on S3 small prefix listings in parallel (~140 for 14,200 shards)
    if data is index and isinstance(data, LocalStore):
        sizes = dict(data.list(split))
    else:
        sizes = dict(data.list_names([s.name for s in shards]))
    if data is index:  # a foreign shards_root may hold anything else: only the set's own folders are ours
        listed = {s.name for s in shards}
        for rel in sorted(sizes):
            if rel.endswith(".tar") and rel not in listed:
                log.warning("%s/%s is not in the manifest: not used", url, rel)

    def storage_problem(shard: Shard) -> str | None:
        size = sizes.get(shard.name)
        if size is None:
            return "missing from storage"
        if size != shard.bytes:
            return f"{size} bytes, the manifest says {shard.bytes} (truncated or replaced)"
        return None

    problems = [storage_problem(s) for s in shards]
    try:
        table = read_split_index(index, entry, cache)
    except (OSError, IndexFileError) as e:  # prep's problem, not the job's: the shards' own index files remain
        log.warning("%s: %s; reading every shard's index file instead", url, e)
        wanted = index_files(shards)
        together = data is index and all(name in sizes for name in wanted)  # listed with the shards already
        index_sizes = sizes if together else dict(index.list_names(wanted))
        table, problems = _table_from_shard_indexes(index, shards, sizes, index_sizes, problems, len(synsets))
    else:
        problems = _check_table(table, shards, problems, len(synsets))
    bad = [(s.name, p) for s, p in zip(shards, problems, strict=True) if p]
    good = [i for i, p in enumerate(problems) if not p]
    for name, why in bad:
        log.warning("left out %s/%s: %s", url, name, why)
    if len(bad) > max_bad_shards or not good:
        listing = "\n".join(f"  {name}: {why}" for name, why in bad)
        raise ShardSetError(
            f"{len(bad)} of {len(shards)} {split} shards in {url} are bad (budget: {max_bad_shards}):\n{listing}\n"
            f"run `python -m data_prep verify {url}` for a full check, then re-run `data_prep shard` to rewrite "
            f"them (delete their _prep/done records first)"
        )
    kept = [shards[i] for i in good]
    if bad:
        log.warning(
            "%d of %d %s shards left out (budget %d); %d samples remain",
            len(bad),
            len(shards),
            split,
            max_bad_shards,
            sum(s.samples for s in kept),
        )
    return ShardSet(url, split, synsets, kept, bad, table.select(good), data)


def index_files(shards: list[Shard]) -> list[str]:
    """The index store's files of these shards: their `.idx`, and their labels files where they have them."""
    return [s.index_name for s in shards] + [s.labels for s in shards if s.labels]


def _check_table(table: SampleTable, shards: list[Shard], problems: list, num_classes: int) -> list:
    """Per shard: the split index has its samples, points only inside its tar and (with a label column) gives
    labels of the layout (vectorised: 14,200 shards)."""
    if table.names != [s.name for s in shards]:
        return [p or "not in the split index as the manifest lists it" for p in problems]
    problems = _label_problems(table, problems, num_classes)
    counts, ends = table.shard_sizes, table.ends()
    out = []
    for shard, problem, count, end in zip(shards, problems, counts.tolist(), ends.tolist(), strict=True):
        if problem is None and count != shard.samples:
            problem = f"the split index lists {count} samples, the manifest {shard.samples}"
        elif problem is None and end > shard.bytes:
            problem = f"the split index points to byte {end}, past the tar's {shard.bytes} bytes"
        out.append(problem)
    return out


def _label_problems(table: SampleTable, problems: list, num_classes: int) -> list:
    """`problems` with, for each shard still without one, its first label outside the layout (a label column
    only: a cls member is read as it is used)."""
    problems = list(problems)
    if table.label is not None:
        wrong = np.flatnonzero((table.label < 0) | (table.label >= num_classes))
        shard_of = np.searchsorted(table.starts, wrong, side="right") - 1
        for row, s in zip(wrong.tolist(), shard_of.tolist(), strict=True):
            if problems[s] is None:
                problems[s] = f"sample {table.key(row)} has label {int(table.label[row])}, outside 0..{num_classes - 1}"
    return problems


def _table_from_shard_indexes(
    index, shards: list[Shard], sizes: dict, index_sizes: dict, problems: list, num_classes: int
):
    """In place of a damaged split index: every shard's index file (and labels file, for a set whose labels are
    values), read from the index store and checked (a request each)."""
    with_labels = any(s.labels for s in shards)

    def read(i: int) -> tuple[str | None, str | None, np.ndarray | None]:
        shard = shards[i]
        if problems[i]:
            return problems[i], None, None
        if shard.index_name not in index_sizes:
            return "its index file is missing", None, None
        labels = None
        try:
            text = index.read(shard.index_name).decode()
            if with_labels:
                if not shard.labels or shard.labels not in index_sizes:
                    return "its labels file is missing", None, None
                labels = read_labels(index, shard.labels)
        except Exception as e:  # noqa: BLE001  (an unreadable index is this shard's problem, not the job's)
            return f"index file unreadable: {e}", None, None
        problem = check_index(text, shard, sizes[shard.name], need_cls=not with_labels)
        if problem is None and labels is not None and len(labels) != shard.samples:
            problem = f"its labels file has {len(labels)} labels, the manifest {shard.samples} samples"
        return problem, text, labels

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read, range(len(shards))))
    problems = [p for p, _text, _labels in results]
    # bad shards (those with a problem, the only ones without a text): empty, left out anyway
    texts = [format_index([]) if p or text is None else text for p, text, _labels in results]
    labels = None
    if with_labels:
        labels = [np.zeros(0, np.int32) if p or v is None else v for p, _text, v in results]
    table = SampleTable.from_index_texts([s.name for s in shards], texts, labels)
    return table, _label_problems(table, problems, num_classes)
