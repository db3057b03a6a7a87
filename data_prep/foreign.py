"""Invariant: `index` never writes to SOURCE nor copies a byte of it; it reads each source shard once, as a stream,
and writes under --out only what the loaders need to read the shards where they lie.

The `index` job: a webdataset shard set this project did not write (timm's imagenet-*-wds, a `ShardWriter`,
img2dataset or GNU tar set) made readable in place. Per source shard it writes, under the output (`<split>/` paths
in plan order, so shards of different source folders never collide):
- `shard-NNNNNN.idx`, DALI's index of the samples kept (with all their real members, as `shard` writes it), and
- `shard-NNNNNN.labels.npy`, one int32 label per kept sample (the split index's label column);
then, once every shard is done (the last task, or `finalize`), the split indexes and a manifest (format /2) whose
`shards_root` is SOURCE and whose shard names are relative to it, with each shard's size and sha256 (hashed while
streaming). Samples are webdataset's (shardset/members.py); the image is the first of IMAGE_EXTS; the label is the
`cls` member, or a json field, read against a declared layout (synsets.txt).

Bad input (a sample without an image or a label, an unreadable member, a truncated or unreadable tar) is counted
and listed by shard and key, never fatal below `--max-bad`. Everything else is `shard`'s machinery: the Slurm
array share, done records, options pinned for reruns, atomic writes, worker processes, finalize.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from swin_common.errors import UserError

from .plan import RECORDS_DIR, PlanError
from .records import build_manifest, missing_records, read_records, task_todo
from .shard import ShardsFailed, check_options, normalise_url, pin_layout, process_shards, write_finished_set
from .shardset.index import format_index
from .shardset.layout import layout_sha256, parse_layout, read_layout
from .shardset.manifest import FORMAT_2, MANIFEST_NAME
from .shardset.members import IMAGE_EXTS, ImageSizeError, Member, group_samples, image_size
from .shardset.store import inside, open_store

log = logging.getLogger(__name__)

INFO_FILES = ("_info.json", "info.json")  # timm's names for a set's split description
PLAN_NAME = "_prep/plan.json"  # the resolved source shards, shared by every task and rerun
# timm's published sets and the label layout their cls numbers (files of timm/data/_info)
KNOWN_SETS = {
    "imagenet-1k-wds": "imagenet_synsets.txt",
    "imagenet-22k-wds": "imagenet22k_synsets.txt",
    "imagenet-12k-wds": "imagenet12k_synsets.txt",
}
DEFAULT_MAX_BAD = "0.1%"
SYNSET = re.compile(r"n\d{8}")
_BRACE = re.compile(r"\{([^{}]*)\}")
_MAX_BAD = re.compile(r"(\d+)|(\d+(?:\.\d+)?)%")


class IndexJobError(UserError, ValueError):
    """An index job that cannot go as asked: no splits, no layout, nowhere to write, too many bad samples."""


@dataclass(frozen=True)
class IndexSpec:
    """One source shard of the plan: its split, its position there, its name relative to SOURCE."""

    split: str
    index: int
    name: str
    expected: int | None = None  # its samples per the set's info file, when it has one

    @property
    def index_name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.idx"

    @property
    def labels_name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.labels.npy"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/{self.split}-{self.index:06d}.json"


@dataclass
class IndexOptions:
    source: str
    out: str | None = None  # default: SOURCE, when it is a writable local folder
    splits: list[str] = field(default_factory=list)  # NAME=PATTERN (brace patterns)
    labels: str | None = None  # a layout file
    known_set: str | None = None  # a key of KNOWN_SETS
    label_key: str = "cls"  # or json:FIELD
    max_bad: str = DEFAULT_MAX_BAD
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    finalize: bool = True
    list_only: bool = False


@dataclass
class EncodedIndex:
    """What indexing one shard gives: the `.idx` text, the labels file's bytes and the completion record."""

    spec: IndexSpec
    index_text: str
    labels: bytes
    record: dict


# ------------------------------------------------------------------ options, layout, plan


def resolve_out(source_url: str, out_url: str | None) -> str:
    """Where the index goes: --out, or SOURCE itself only when it is a writable local folder."""
    source = normalise_url(source_url)
    if not source.startswith("s3://") and not os.path.isdir(source):
        raise IndexJobError(f"source not found: {source} is not a folder (give a folder or s3://bucket/prefix)")
    writable = not source.startswith("s3://") and os.access(source, os.W_OK)
    if out_url is None or normalise_url(out_url) == source:
        if not writable:
            raise IndexJobError(
                f"{source} is {'on S3' if source.startswith('s3://') else 'read-only'}: give --out, a folder or "
                f"s3:// prefix for the index (the source is never written)"
            )
        return source
    return out_url


def resolve_layout(opts: IndexOptions) -> tuple[list[str], str]:
    """(the label layout, where it came from): --labels FILE, or --set NAME's layout from timm's own files."""
    if opts.labels and opts.known_set:
        raise IndexJobError("give --labels or --set, not both")
    if opts.labels:
        return read_layout(opts.labels), opts.labels
    if opts.known_set:
        return known_layout(opts.known_set), f"{opts.known_set} ({KNOWN_SETS[opts.known_set]} of timm)"
    raise IndexJobError(
        "no label layout: give --labels FILE (a synset per line, in label order) or --set " + "|".join(KNOWN_SETS)
    )


def known_layout(name: str) -> list[str]:
    """The layout a published set's cls numbers, read from timm's package files (timm is not imported)."""
    if name not in KNOWN_SETS:
        raise IndexJobError(f"unknown set {name!r}; known: {', '.join(KNOWN_SETS)}")
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise IndexJobError(f"--set {name} reads timm's label files: install timm, or give --labels FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / KNOWN_SETS[name]
    return parse_layout(path.read_text(), str(path))


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order: `{0000..4095}` (zero-padded as written), `{a,b}`."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        items = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(pattern[: m.start()] + item + pattern[m.end() :])]


def plan_sources(source, split_args: list[str]) -> tuple[list[IndexSpec], str]:
    """(the source shards, what named them): --split patterns, else timm's info file, else sub-folders of tars."""
    info_name = next((n for n in INFO_FILES if source.exists(n)), None)
    lengths: dict[str, int] = {}
    info_splits: dict[str, list[str]] = {}
    if info_name is not None:
        try:
            info = json.loads(source.read(info_name))
            for split, entry in info["splits"].items():
                info_splits[split] = list(entry["filenames"])
                lengths.update(zip(entry["filenames"], entry.get("shard_lengths") or (), strict=False))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IndexJobError(
                f"{source.url}/{info_name}: not a timm split description (splits.NAME.filenames): {e!r}"
            ) from None
    if split_args:
        named: dict[str, list[str]] = {}
        for arg in split_args:
            split, eq, pattern = arg.partition("=")
            if not eq or not split or not pattern or "/" in split:
                raise IndexJobError(
                    f"--split {arg!r}: expected NAME=PATTERN, e.g. train=in22k-train-{{0000..4095}}.tar"
                )
            named.setdefault(split, []).extend(expand_braces(pattern))
        origin = "--split"
    elif info_splits:
        named, origin = info_splits, info_name or ""
    else:
        dirs, _files = source.list_dir()
        tars = {d: sorted(r for r, _ in source.list(d) if r.endswith(".tar") and r.count("/") == 1) for d in dirs}
        named = {d: names for d, names in tars.items() if names}
        origin = "sub-folders"
        if not named:
            raise IndexJobError(
                f"{source.url}: no {' or '.join(INFO_FILES)}, no --split and no sub-folder holding .tar files; "
                f"name the shards with --split NAME=PATTERN"
            )
    plan = [
        IndexSpec(split, i, inside(name, source.url), lengths.get(name))
        for split, names in named.items()
        for i, name in enumerate(names)
    ]
    found = dict(source.list_names([s.name for s in plan]))
    missing = [s.name for s in plan if s.name not in found]
    if missing:
        raise IndexJobError(
            f"{len(missing)} of the {len(plan)} shards named by {origin} are not in {source.url}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return plan, origin


def read_plan(out) -> tuple[list[IndexSpec], str] | None:
    """The plan saved in the output (`_prep/plan.json`), or None when there is none yet."""
    if not out.exists(PLAN_NAME):
        return None
    doc = json.loads(out.read(PLAN_NAME))
    return [IndexSpec(**s) for s in doc["shards"]], doc["origin"]


def load_or_plan(source, out, split_args: list[str]) -> tuple[list[IndexSpec], str]:
    """The plan saved in the output, or a new one saved there: every task and rerun uses the same."""
    saved = read_plan(out)
    if saved is not None:
        return saved
    plan, origin = plan_sources(source, split_args)
    doc = {"origin": origin, "shards": [vars(s) for s in plan]}
    out.write_bytes(PLAN_NAME, json.dumps(doc, indent=1).encode())
    return plan, origin


def bad_limit(max_bad: str, samples: int) -> int:
    """The most bad samples --max-bad allows: N, or P% of the samples read."""
    m = _MAX_BAD.fullmatch(max_bad.strip())
    if m is None:
        raise IndexJobError(f"--max-bad {max_bad!r}: expected a count (e.g. 100) or a percentage (e.g. 0.1%)")
    return int(m.group(1)) if m.group(1) is not None else int(float(m.group(2)) / 100 * samples)


# ------------------------------------------------------------------ one shard


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it, and reports progress every MiB."""

    def __init__(self, raw, progress, every: int = 1 << 20):
        self.raw, self.progress, self.every = raw, progress, every
        self.sha, self.bytes, self._unreported = hashlib.sha256(), 0, 0

    def read(self, n: int | None = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        self._unreported += len(data)
        if self._unreported >= self.every:
            self.progress(self._unreported)
            self._unreported = 0
        return data

    def finish(self) -> None:
        """Reads to the end (the tar's padding too: the size and sha256 are the whole file's) and closes."""
        while self.read(1 << 20):
            pass
        self.progress(self._unreported)
        self._unreported = 0
        self.raw.close()


def _read_members(
    stream: _HashingReader, want: set[str]
) -> tuple[list[Member], dict[str, bytes], dict[str, str], str | None]:
    """(members, bytes of the wanted small members, why each unreadable image, why the tar ends early or None).

    One pass of tarfile's stream mode: images are read one at a time to check their header, never kept."""
    members: list[Member] = []
    payload: dict[str, bytes] = {}
    unreadable: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:  # type: ignore[call-overload]
            for info in tar:
                members.append(Member(info.name, info.offset_data, info.size, info.isreg()))
                if not info.isreg():
                    continue
                suffix = info.name.rpartition("/")[2].partition(".")[2].lower()
                if suffix in want or suffix in IMAGE_EXTS:
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                    if suffix in IMAGE_EXTS:
                        try:
                            image_size(data)
                        except ImageSizeError as e:
                            unreadable[info.name] = str(e)
                    else:
                        payload[info.name] = data
    except (tarfile.TarError, EOFError) as e:
        return members, payload, unreadable, f"{type(e).__name__}: {e}"
    return members, payload, unreadable, None


def index_shard(spec: IndexSpec, source, synsets: list[str], label_key: str, progress) -> EncodedIndex:
    """Indexes one source shard from one streaming read: its kept samples' `.idx`, their labels, its record."""
    json_field = label_key.partition(":")[2] if label_key.startswith("json:") else None
    stream = _HashingReader(source.open_read(spec.name), progress)
    members, payload, unreadable, cut = _read_members(stream, {"json"} if json_field else {"cls", "json"})
    stream.finish()
    size = stream.bytes
    whole = [m for m in members if m.offset + m.size <= size]  # a truncated tar: members cut short are dropped
    samples = list(group_samples(whole))
    rejected: list[list[str]] = []
    if cut is not None:
        rejected.append([spec.name, f"truncated or unreadable tar ({cut}): indexed up to the damage"])
        if samples and samples[-1].bad is None:
            samples[-1].bad = "cut short where the tar ends"
    components: list[list[tuple[str, int, int, str]]] = []
    labels: list[int] = []
    class_counts: Counter[int] = Counter()
    not_in_layout, checked, mismatched = 0, 0, 0
    examples: list[str] = []
    for sample in samples:
        where = f"{spec.name}/{sample.key}"
        label, doc, why = _label(sample, payload, json_field, unreadable)
        if why is None and label is not None and label != -1 and not 0 <= label < len(synsets):
            why = f"label {label} is outside the layout's {len(synsets)} classes"
        if why is not None:
            rejected.append([where, why])
            continue
        assert label is not None
        if label == -1:
            not_in_layout += 1
            continue
        named = (doc or {}).get("synset") or (doc or {}).get("class_name")
        if isinstance(named, str) and SYNSET.fullmatch(named):
            checked += 1
            if named != synsets[label]:
                mismatched += 1
                if len(examples) < 5:
                    examples.append(f"{where}: label {label} is {synsets[label]} in the layout, its json says {named}")
        components.append([(ext, m.offset, m.size, m.name) for ext, m in sample.members.items()])
        labels.append(label)
        class_counts[label] += 1
    buf = io.BytesIO()
    np.save(buf, np.asarray(labels, np.int32))
    record = {
        "name": spec.name,
        "index": spec.index_name,
        "labels": spec.labels_name,
        "split": spec.split,
        "samples": len(components),
        "source_samples": len(samples),
        "expected_samples": spec.expected,
        "bytes": size,
        "sha256": stream.sha.hexdigest(),
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "rejected": rejected,
        "not_in_layout": not_in_layout,
        "label_check": {"checked": checked, "mismatched": mismatched, "examples": examples},
    }
    return EncodedIndex(spec, format_index(components), buf.getvalue(), record)


def _label(sample, payload: dict[str, bytes], json_field: str | None, unreadable: dict[str, str]):
    """(label, the sample's json or None, why the sample is bad or None)."""
    for m in sample.members.values():
        if any(c.isspace() for c in m.name):
            return None, None, f"member name {m.name!r} holds white space (DALI's index format cannot)"
        try:
            m.name.encode("utf-8")
        except UnicodeEncodeError:
            return None, None, f"member name {m.name!r} is not UTF-8"
    if sample.bad is not None:
        return None, None, sample.bad
    image = sample.image()
    if image is None:
        return None, None, f"no image ({'|'.join(IMAGE_EXTS)}); members: {', '.join(sample.members) or 'none'}"
    if image[1].name in unreadable:
        return None, None, f"unreadable {image[0]}: {unreadable[image[1].name]}"
    doc = None
    if "json" in sample.members:
        try:
            doc = json.loads(payload[sample.members["json"].name])
            doc = doc if isinstance(doc, dict) else None
        except (ValueError, KeyError):
            if json_field is not None:
                return None, None, "json member unreadable"
    if json_field is not None:
        if doc is None or json_field not in doc:
            return None, None, f"no {json_field!r} in its json"
        value = doc[json_field]
        if not isinstance(value, int) or isinstance(value, bool):
            return None, doc, f"json {json_field!r} is {value!r}, not an integer"
        return value, doc, None
    if "cls" not in sample.members:
        return None, doc, "no cls (label)"
    text = payload.get(sample.members["cls"].name, b"")
    try:
        return int(text.decode("ascii").strip()), doc, None
    except (UnicodeDecodeError, ValueError):
        return None, doc, f"cls is not an integer: {text[:20]!r}"


def commit_index(out, encoded: EncodedIndex) -> dict:
    """Writes a shard's `.idx`, then its labels, then its record (last: a shard without one is redone)."""
    spec = encoded.spec
    for name in (spec.index_name, spec.labels_name, spec.record_name):
        out.remove_stale_staging(name)
    out.write_bytes(spec.index_name, encoded.index_text.encode())
    out.write_bytes(spec.labels_name, encoded.labels)
    out.write_bytes(spec.record_name, json.dumps(encoded.record).encode(), durable=False)
    return encoded.record


# ------------------------------------------------------------------ the job


def run_index(opts: IndexOptions) -> dict:
    """Indexes this task's share of the source shards (skipping done ones); the last task finalizes the set."""
    if not (opts.label_key == "cls" or (opts.label_key.startswith("json:") and len(opts.label_key) > 5)):
        raise IndexJobError(f"--label-key {opts.label_key!r}: expected cls or json:FIELD")
    bad_limit(opts.max_bad, 0)  # the option's syntax, before any work
    out_url = resolve_out(opts.source, opts.out)
    source, out = open_store(opts.source), open_store(out_url)
    synsets, layout_origin = resolve_layout(opts)
    options = {
        "kind": "index",
        "source": normalise_url(opts.source),
        "splits": list(opts.splits),
        "label_key": opts.label_key,
        "layout": layout_origin,
        "layout_sha256": layout_sha256(synsets),
    }
    check_options(out, options)
    pin_layout(out, synsets)
    plan, origin = load_or_plan(source, out, opts.splits)
    if opts.list_only:
        return {"shards_planned": len(plan), "splits": dict(Counter(s.split for s in plan)), "named_by": origin}
    mine, todo = task_todo(out, plan, opts.task_index, opts.num_tasks, "index")
    sizes = dict(source.list_names([s.name for s in todo])) if todo else {}
    bar = tqdm(total=sum(sizes.get(s.name, 0) for s in todo), unit="B", unit_scale=True, desc="indexing")
    t0 = time.time()
    records, failures = process_shards(
        todo,
        plan,
        lambda spec, progress: index_shard(spec, source, synsets, opts.label_key, progress),
        lambda encoded: commit_index(out, encoded),
        opts.workers,
        bar,
    )
    elapsed = time.time() - t0
    read = sum(r["bytes"] for r in records)
    summary = {
        "shards_indexed": len(records),
        "shards_skipped": len(mine) - len(todo),
        "shards_failed": len(failures),
        "samples": sum(r["samples"] for r in records),
        "bad_samples": sum(len(r["rejected"]) for r in records),
        "not_in_layout": sum(r["not_in_layout"] for r in records),
        "bytes_read": read,
        "seconds": round(elapsed, 2),
        "mb_per_second": round(read / 1e6 / elapsed, 1) if elapsed > 0 else None,
    }
    if failures:
        raise ShardsFailed(
            f"{len(failures)} shard(s) failed (rerun the same command to resume): "
            + "; ".join(f"{n}: {e}" for n, e in failures)
        )
    if opts.finalize and not missing_records(out, plan):
        finalize_index(out, options, opts.max_bad)
        summary["manifest"] = f"{out.url}/{MANIFEST_NAME}"
    return summary


def finalize_index(out, options: dict, max_bad: str | None = None) -> dict:
    """Writes the split indexes and the manifest of an indexed set once every shard has its record; IndexJobError
    (naming the count and the first few) when its bad samples are over `max_bad`."""
    saved = read_plan(out)
    if saved is None:
        raise PlanError(f"{out.url} holds no index plan ({PLAN_NAME}): finalize takes the --out of `data_prep index`")
    plan, origin = saved
    synsets = parse_layout(out.read("synsets.txt").decode(), f"{out.url}/synsets.txt")
    records = read_records(out, plan)
    manifest = build_manifest(out, plan, options, synsets, [], records=records)
    rejected = manifest["rejected"]
    read = sum(r["source_samples"] for r in records)
    limit = bad_limit(max_bad or DEFAULT_MAX_BAD, read)
    if len(rejected) > limit:
        first = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:3])
        raise IndexJobError(
            f"{len(rejected)} bad samples in {len(records)} shards of {options['source']}, over --max-bad "
            f"{max_bad or DEFAULT_MAX_BAD} ({limit}): {first}{' ...' if len(rejected) > 3 else ''}"
        )
    checked = sum(r["label_check"]["checked"] for r in records)
    mismatched = sum(r["label_check"]["mismatched"] for r in records)
    if mismatched:
        log.warning("%d of %d labels checked against their json's synset disagree with the layout", mismatched, checked)
    differing = [
        {"name": r["name"], "expected": r["expected_samples"], "found": r["source_samples"]}
        for r in records
        if r["expected_samples"] is not None and r["expected_samples"] != r["source_samples"]
    ]
    if differing:
        log.warning("%d shards hold another number of samples than %s says", len(differing), origin)
    json_field = options["label_key"].partition(":")[2]
    manifest.update(
        format=FORMAT_2,
        sample={
            "__key__": "webdataset's: the member path up to the first dot of its last component",
            "image": "the first of " + ", ".join(IMAGE_EXTS) + " present",
            "label": f"json field {json_field}" if json_field else "cls, ascii int",
        },
        shards_root=options["source"],
        source={"kind": "webdataset", "shards_named_by": origin, "label_key": options["label_key"]},
        bad_samples=len(rejected),
        not_in_layout={
            split: sum(r["not_in_layout"] for r in records if r["split"] == split)
            for split in sorted({r["split"] for r in records})
        },
        label_check={
            "checked": checked,
            "mismatched": mismatched,
            "examples": [e for r in records for e in r["label_check"]["examples"]][:10],
        },
        samples_differing_from_info=differing,
    )
    for unused in ("converted", "set_aside_classes"):
        manifest.pop(unused, None)
    write_finished_set(out, manifest)
    return manifest


def verify_index(out, manifest: dict, progress=None) -> tuple[int, int, list[str]]:
    """(shards, samples, problems) of an indexed set, re-indexed from its source: each shard read once more, its
    size and sha256 against the manifest, its `.idx` and labels files against a fresh index, byte for byte."""
    saved = read_plan(out)
    if saved is None:
        return 0, 0, [f"{out.url}: no index plan ({PLAN_NAME}): not a set `data_prep index` wrote"]
    plan, _ = saved
    source = open_store(manifest["shards_root"])
    synsets = manifest["label_layout"]["synsets"]
    label_key = manifest["source"]["label_key"]
    entries = {entry["name"]: entry for entry in manifest["shards"]}
    problems: list[str] = []
    samples = 0
    for spec in plan:
        entry = entries.get(spec.name)
        if entry is None:
            problems.append(f"{spec.name}: planned but not in the manifest")
            continue
        try:
            fresh = index_shard(spec, source, synsets, label_key, lambda n: None)
        except Exception as e:  # noqa: BLE001  (verify reports whatever it finds wrong and goes on)
            problems.append(f"{source.url}/{spec.name}: cannot be read again ({type(e).__name__}: {e})")
            continue
        record = fresh.record
        if (record["bytes"], record["sha256"]) != (entry["bytes"], entry["sha256"]):
            problems.append(
                f"{source.url}/{spec.name}: {record['bytes']} bytes, sha256 {record['sha256'][:12]}..., the manifest "
                f"says {entry['bytes']} bytes, {entry['sha256'][:12]}...: the source shard changed since it was indexed"
            )
        for name, want in ((spec.index_name, fresh.index_text.encode()), (spec.labels_name, fresh.labels)):
            try:
                if out.read(name) != want:
                    problems.append(f"{out.url}/{name}: differs from what indexing the source gives now")
            except OSError as e:
                problems.append(f"{out.url}/{name}: {e}")
        samples += record["samples"]
        if progress is not None:
            progress()
    return len(plan), samples, problems
