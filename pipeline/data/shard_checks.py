"""A shard set as a training job opens it: the manifest's shards of one split, each checked cheaply before any
pipeline starts, so a truncated or mismatched shard never reaches DALI (which cannot skip a bad sample, and
segfaults on an index entry that points past the end of its tar).

Checks per shard, without reading it: listed in the manifest, present on storage with the manifest's size, an
index file that parses, has the manifest's sample count, gives every sample its jpg and cls, and points only
inside the tar (offset + size <= file size). A bad shard is left out with a warning, up to a budget; past it,
an error names the shards and the `data_prep verify` command to run.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from data_prep.shardset.manifest import read_manifest
from data_prep.shardset.store import open_store
from data_prep.shardset.index import parse_index

log = logging.getLogger("pipeline.data")
REQUIRED = ("jpg", "cls")


class ShardSetError(RuntimeError):
    pass


@dataclass(frozen=True)
class Shard:
    name: str  # "train/shard-000000.tar", relative to the set
    index_name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardSet:
    url: str
    split: str
    synsets: list[str]
    shards: list[Shard]  # the usable ones, in manifest order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard, why it was left out)

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def check_index(text: str, shard: Shard, file_size: int) -> str | None:
    """Why the index cannot be trusted for this shard, or None."""
    try:
        samples = parse_index(text)
    except ValueError as e:
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


def open_shard_set(url: str, split: str = "train", max_bad_shards: int = 0) -> ShardSet:
    """The split's usable shards; raises ShardSetError when more than max_bad_shards are bad or none is left."""
    store = open_store(url)
    manifest = read_manifest(store)
    synsets = manifest["label_layout"]["synsets"]
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if not entries:
        raise ShardSetError(f"{url} has no {split!r} shards (splits: {sorted(manifest['totals'])})")
    shards = [Shard(e["name"], e["index"], e["samples"], e["bytes"], e["sha256"]) for e in entries]
    sizes = dict(store.list(split))  # one listing (a few LISTs on S3), not a request per shard
    listed = {s.name for s in shards}
    for rel in sorted(sizes):
        if rel.endswith(".tar") and rel not in listed:
            log.warning("%s/%s is not in the manifest: not used", url, rel)

    def problem(shard: Shard) -> str | None:
        size = sizes.get(shard.name)
        if size is None:
            return "missing from storage"
        if size != shard.bytes:
            return f"{size} bytes, the manifest says {shard.bytes} (truncated or replaced)"
        if shard.index_name not in sizes:
            return "its index file is missing"
        try:
            text = store.read(shard.index_name).decode()
        except Exception as e:  # an unreadable index is this shard's problem, not the job's
            return f"index file unreadable: {e}"
        return check_index(text, shard, size)

    with ThreadPoolExecutor(16) as pool:
        problems = list(pool.map(problem, shards))
    bad = [(s.name, p) for s, p in zip(shards, problems, strict=True) if p]
    good = [s for s, p in zip(shards, problems, strict=True) if not p]
    for name, why in bad:
        log.warning("left out %s/%s: %s", url, name, why)
    if len(bad) > max_bad_shards or not good:
        listing = "\n".join(f"  {name}: {why}" for name, why in bad)
        raise ShardSetError(
            f"{len(bad)} of {len(shards)} {split} shards in {url} are bad (budget: {max_bad_shards}):\n{listing}\n"
            f"run `python -m data_prep verify {url}` for a full check, then re-run `data_prep shard` to rewrite "
            f"them (delete their _prep/done records first)")
    if bad:
        log.warning("%d of %d %s shards left out (budget %d); %d samples remain", len(bad), len(shards), split,
                    max_bad_shards, sum(s.samples for s in good))
    return ShardSet(url, split, synsets, good, bad)
