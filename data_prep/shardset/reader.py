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
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from swin_common.errors import UserError

from .index import IndexFileError, format_index, parse_index
from .manifest import read_manifest
from .split_index import SampleTable, read_split_index
from .store import LocalStore, S3Store, open_store

log = logging.getLogger(__name__)
REQUIRED = ("jpg", "cls")


class ShardSetError(UserError, RuntimeError):
    """A shard set that cannot be read as asked: no such split, no split index, too many bad shards."""


@dataclass(frozen=True)
class Shard:
    name: str  # "train/shard-000000.tar", relative to the set
    index_name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardSet:
    """The usable shards of one split and where their samples lie (`table`), read through one store client."""

    url: str
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


def check_index(text: str, shard: Shard, file_size: int) -> str | None:
    """Why a shard's own `.idx` cannot be trusted for this shard, or None."""
    try:
        samples = parse_index(text)
    except IndexFileError as e:
        return f"index file unreadable: {e}"
    if len(samples) != shard.samples:
        return f"index lists {len(samples)} samples, the manifest {shard.samples}"
    for n, components in enumerate(samples):
        exts = {ext for ext, _o, _s, _name in components}
        if not exts.issuperset(REQUIRED):
            return f"sample {n} ({components[0][3] if components else '?'}) lacks {sorted(set(REQUIRED) - exts)}"
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


def open_shard_set(url: str, split: str = "train", max_bad_shards: int = 0, cache=None) -> ShardSet:
    """The split's usable shards and where their samples lie, or ShardSetError saying why not.

    The split's usable shards and where their samples lie; raises ShardSetError when the split has no shards or
    no split index (`split_indexes` in the manifest), or when more than max_bad_shards are bad or none is left.
    On S3 the split index is fetched through `cache` (see read_split_index), once per node."""
    store = open_store(url)
    manifest = read_manifest(store)
    synsets = manifest["label_layout"]["synsets"]
    entries, entry = split_entries(manifest, url, split)
    shards = [Shard(e["name"], e["index"], e["samples"], e["bytes"], e["sha256"]) for e in entries]
    # one listing, not a request per shard: on S3 small prefix listings in parallel (~140 for 14,200 shards)
    sizes = dict(store.list(split) if isinstance(store, LocalStore) else store.list_names([s.name for s in shards]))
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
        table = read_split_index(store, entry, cache)
    except (OSError, IndexFileError) as e:  # prep's problem, not the job's: the shards' own index files remain
        log.warning("%s: %s; reading every shard's index file instead", url, e)
        table, problems = _table_from_shard_indexes(store, shards, sizes, problems)
    else:
        problems = _check_table(table, shards, problems)
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
    return ShardSet(url, split, synsets, kept, bad, table.select(good), store)


def _check_table(table: SampleTable, shards: list[Shard], problems: list) -> list:
    """Per shard: the split index has its samples and points only inside its tar (vectorised: 14,200 shards)."""
    if table.names != [s.name for s in shards]:
        return [p or "not in the split index as the manifest lists it" for p in problems]
    counts, ends = table.shard_sizes, table.ends()
    out = []
    for shard, problem, count, end in zip(shards, problems, counts.tolist(), ends.tolist(), strict=True):
        if problem is None and count != shard.samples:
            problem = f"the split index lists {count} samples, the manifest {shard.samples}"
        elif problem is None and end > shard.bytes:
            problem = f"the split index points to byte {end}, past the tar's {shard.bytes} bytes"
        out.append(problem)
    return out


def _table_from_shard_indexes(store, shards: list[Shard], sizes: dict, problems: list):
    """In place of a damaged split index: every shard's index file, read and checked (a request each)."""

    def read(i: int) -> tuple[str | None, str | None]:
        shard = shards[i]
        if problems[i]:
            return problems[i], None
        if shard.index_name not in sizes:
            return "its index file is missing", None
        try:
            text = store.read(shard.index_name).decode()
        except Exception as e:  # noqa: BLE001  (an unreadable index is this shard's problem, not the job's)
            return f"index file unreadable: {e}", None
        return check_index(text, shard, sizes[shard.name]), text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read, range(len(shards))))
    problems = [p for p, _text in results]
    # bad shards (those with a problem, the only ones without a text): empty, left out anyway
    texts = [format_index([]) if p or text is None else text for p, text in results]
    return SampleTable.from_index_texts([s.name for s in shards], texts), problems
