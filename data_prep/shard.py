"""The `shard` job: list the source, plan, write this task's shards with K worker processes, finalize."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from swin_common.errors import UserError

from .plan import PlanError, plan_shards
from .records import build_manifest, missing_records, task_todo
from .shardset.layout import check_covers, format_layout, layout_sha256, parse_layout, read_layout
from .shardset.manifest import MANIFEST_NAME, describe_folder, write_manifest
from .shardset.split_index import write_split_indexes
from .shardset.store import open_store
from .sources import LISTING_NAME, Listing, scan_source
from .writer import ImageOptions, commit_shard, encode_shard

log = logging.getLogger(__name__)
OPTIONS_NAME = "_prep/options.json"


class ShardsFailed(UserError, RuntimeError):
    """Shards of this task that could not be written (each logged with its cause); a rerun resumes them."""


@dataclass
class ShardOptions:
    source: str
    out: str
    source_format: str = "auto"
    layout: str | None = None  # layout file; default: the sorted synsets found in the source
    seed: int = 0
    holdout_per_class: int = 0
    max_samples: int | None = 1000
    max_bytes: int | None = None
    resize_shorter: int | None = None
    jpeg_quality: int = 90
    validate: str = "scaled"
    min_size: int | None = None  # images whose shorter side is under it are rejected
    exif: str = "apply"  # apply the EXIF orientation and strip non-colour metadata | strip | keep
    min_images_per_class: int = 0  # classes with fewer images are set aside (not in the layout by default)
    workers: int = 1
    threads: int = 2  # per worker, checking images; changes speed, never bytes
    task_index: int = 0
    num_tasks: int = 1
    finalize: bool = True
    list_only: bool = False  # list the source (cached in the output) and plan, write no shard


def load_or_scan(source, out, source_format: str, workers: int) -> Listing:
    """The source listing is cached in the output, so later tasks and reruns do not list 14M files again."""
    listing = read_listing(out)
    if listing is not None:
        if source_format not in ("auto", listing.kind):
            raise PlanError(f"{out.url} was prepared from a {listing.kind} source, not {source_format}")
        return listing
    t0 = time.time()
    listing = scan_source(source, source_format, workers)
    listing.save(out, LISTING_NAME)
    log.info(
        "listed %s: %d images in %d synsets (%s) in %.1fs",
        source.url,
        len(listing),
        len(listing.synsets),
        listing.kind,
        time.time() - t0,
    )
    return listing


def read_listing(out) -> Listing | None:
    """The source listing cached in the output (`_prep/listing.npz`), or None when the output holds none yet."""
    if out.exists(LISTING_NAME):
        return Listing.load(out, LISTING_NAME)
    return None


def set_aside_small_classes(listing: Listing, min_images: int) -> Listing:
    """The listing without the classes too small to keep, which the manifest reports.

    ImageNet-21K-P style: classes with fewer than `min_images` listed images are left out of the plan (and of
    the default layout) and reported in the manifest's `set_aside_classes`."""
    if min_images <= 0:
        return listing
    counts = listing.images_per_synset().tolist()
    small = {s: n for s, n in zip(listing.synsets, counts, strict=True) if n < min_images}
    if not small:
        return listing
    log.info("%d of %d classes have fewer than %d images: set aside", len(small), len(listing.synsets), min_images)
    return listing.without_synsets(set(small), small)


def resolve_layout(out, listing: Listing, layout_file: str | None) -> list[str]:
    synsets = read_layout(layout_file) if layout_file else listing.synsets
    check_covers(synsets, listing.synsets)
    return pin_layout(out, synsets)


def pin_layout(out, synsets: list[str]) -> list[str]:
    """The output's label layout: written as synsets.txt by the first run, the same one required of every rerun."""
    if out.exists("synsets.txt"):
        existing = parse_layout(out.read("synsets.txt").decode(), f"{out.url}/synsets.txt")
        if existing != synsets:
            raise PlanError(
                f"{out.url}/synsets.txt holds another label layout than this run's; use a new "
                f"output folder or the same layout"
            )
    else:
        out.write_bytes("synsets.txt", format_layout(synsets).encode())
    return synsets


def normalise_url(url: str) -> str:
    """One spelling per source: absolute local paths, no trailing slash."""
    if url.startswith("s3://"):
        return url.rstrip("/")
    return os.path.abspath(url)


def output_options(opts: ShardOptions, kind: str, synsets: list[str]) -> dict:
    """The options that decide the shards' bytes; a rerun into the same output must use the same ones."""
    return {
        "source": normalise_url(opts.source),
        "source_format": kind,
        "seed": opts.seed,
        "holdout_per_class": opts.holdout_per_class,
        "max_samples": opts.max_samples,
        "max_bytes": opts.max_bytes,
        "resize_shorter": opts.resize_shorter,
        "jpeg_quality": opts.jpeg_quality,
        "validate": opts.validate,
        "min_size": opts.min_size,
        "exif": opts.exif,
        "min_images_per_class": opts.min_images_per_class,
        "layout_sha256": layout_sha256(synsets),
    }


def check_options(out, options: dict) -> None:
    if out.exists(OPTIONS_NAME):
        before = json.loads(out.read(OPTIONS_NAME))
        changed = {k: (before.get(k), v) for k, v in options.items() if before.get(k) != v}
        if changed:
            what = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise PlanError(
                f"{out.url} holds shards prepared with other options ({what}); use a new output "
                f"folder or the same options"
            )
    else:
        out.write_bytes(OPTIONS_NAME, json.dumps(options, indent=1).encode())


def shard_plan_for(out, opts: ShardOptions):
    source = open_store(opts.source)
    listing = set_aside_small_classes(
        load_or_scan(source, out, opts.source_format, opts.workers), opts.min_images_per_class
    )
    synsets = resolve_layout(out, listing, opts.layout)
    options = output_options(opts, listing.kind, synsets)
    check_options(out, options)
    plan = plan_shards(listing, opts.seed, opts.holdout_per_class, opts.max_samples, opts.max_bytes)
    return source, listing, synsets, options, plan


# Worker processes inherit the job through fork; only a shard's position in the plan crosses the pipe.
_JOB: dict = {}


def _init_worker(progress_queue) -> None:
    _die_with_parent()
    gc.freeze()  # the inherited job (a plan of up to 14M items) is never collected nor copied on write by gc
    _JOB["progress"] = progress_queue.put


def _die_with_parent() -> None:
    """A worker must not outlive a killed job (kill -9, scancel): it would race the rerun on its shard."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _encode_planned(position: int):
    j = _JOB
    return j["encode"](j["plan"][position], j["progress"])


def run_shard(opts: ShardOptions) -> dict:
    out = open_store(opts.out)
    source, listing, synsets, options, plan = shard_plan_for(out, opts)
    if opts.list_only:
        return {
            "images": len(listing),
            "synsets": len(listing.synsets),
            "kind": listing.kind,
            "rejected_while_listing": len(listing.rejected),
            "shards_planned": len(plan),
        }
    mine, todo = task_todo(out, plan, opts.task_index, opts.num_tasks, "write")
    labels = {s: i for i, s in enumerate(synsets)}
    image_opts = ImageOptions(opts.resize_shorter, opts.jpeg_quality, opts.validate, opts.min_size, opts.exif)
    t0 = time.time()
    records, failures = process_shards(
        todo,
        plan,
        lambda spec, progress: encode_shard(spec, source, out, labels, image_opts, progress, opts.threads),
        lambda encoded: commit_shard(out, encoded),
        opts.workers,
        bar=tqdm(total=sum(len(s) for s in todo), unit="img", desc="sharding", smoothing=0.1),
    )
    elapsed = time.time() - t0
    summary = _summarise(records, failures, elapsed, len(mine) - len(todo))
    if failures:
        raise ShardsFailed(
            f"{len(failures)} shard(s) failed (rerun the same command to resume): "
            + "; ".join(f"{n}: {e}" for n, e in failures)
        )
    if opts.finalize and not missing_records(out, plan):
        write_finished_set(out, build_manifest(out, plan, options, synsets, listing.rejected, listing.set_aside))
        summary["manifest"] = f"{out.url}/{MANIFEST_NAME}"
    return summary


def process_shards(
    todo: list,
    plan: list,
    encode: Callable[[Any, Callable[[int], None]], Any],
    commit: Callable[[Any], dict],
    workers: int,
    bar: tqdm,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records, failures): each shard of `todo` encoded, then committed; a failed one logged, the others go on.

    `encode(spec, progress)` does the CPU-bound part (in one of `workers` forked processes, which inherit
    everything through fork: only a shard's position in `plan` crosses the pipe; `progress(n)` moves `bar`);
    `commit(encoded)` makes it visible and returns its record (in this process, on threads, meanwhile).
    Shared by `shard` and `index`: specs need `split`, `index` and `name`."""
    records: list[dict] = []
    failures: list[tuple[str, str]] = []  # (shard name, why)
    pending_commits: list[tuple[Any, Future[dict]]] = []
    position = {(s.split, s.index): i for i, s in enumerate(plan)}
    if workers <= 1 or len(todo) <= 1:
        for spec in todo:
            try:
                records.append(commit(encode(spec, bar.update)))
            except Exception as e:  # noqa: BLE001  (keep the other shards going; the rerun picks this one up)
                log.error("shard %s failed: %s", spec.name, _why(e))
                failures.append((spec.name, _why(e)))
        bar.close()
        return records, failures
    ctx = mp.get_context("fork")
    progress = ctx.Queue()
    _JOB.update(plan=plan, encode=encode)
    # Workers encode (CPU); this process commits (fsync + rename, or the S3 upload) in threads meanwhile.
    with (
        ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)) as pool,
        ThreadPoolExecutor(workers) as committer,
    ):
        pending = {pool.submit(_encode_planned, position[(s.split, s.index)]): s for s in todo}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress, bar)
            for fut in done:
                spec = pending.pop(fut)
                error = fut.exception()
                if error is None:
                    pending_commits.append((spec, committer.submit(commit, fut.result())))
                    continue
                log.error("shard %s failed: %s", spec.name, _why(error))
                failures.append((spec.name, _why(error)))
        for spec, pending_commit in pending_commits:
            try:
                records.append(pending_commit.result())
            except Exception as e:  # noqa: BLE001  (keep the other shards going; the rerun picks this one up)
                log.error("shard %s failed: %s", spec.name, _why(e))
                failures.append((spec.name, _why(e)))
    _drain(progress, bar)
    bar.close()
    _JOB.clear()
    return records, failures


def _why(e: BaseException) -> str:
    """The error with its type, and for an OSError the file it names (repr() drops the file name)."""
    return f"{type(e).__name__}: {e}"


def _drain(progress, bar) -> None:
    try:
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass


def _summarise(records: list[dict], failures: list, elapsed: float, skipped: int) -> dict:
    images = sum(r["samples"] for r in records)
    seen = sum(r["planned"] for r in records)
    reasons = Counter(reason.split(":")[0] for r in records for _p, reason in r["rejected"])
    return {
        "shards_written": len(records),
        "shards_skipped": skipped,
        "shards_failed": len(failures),
        "images_written": images,
        "images_rejected": sum(reasons.values()),
        "rejected_by_reason": dict(reasons),
        "images_converted": sum(len(r["converted"]) for r in records),
        "bytes_written": sum(r["bytes"] for r in records),
        "seconds": round(elapsed, 2),
        "images_per_second": round(seen / elapsed, 1) if elapsed > 0 else None,
    }


def prepared_output(out_url: str):
    """(store, options) of an output that `shard` or `index` prepared; FileNotFoundError saying what is there
    instead (nothing prepared, a finished set, something else)."""
    out = open_store(out_url)
    if not out.exists(OPTIONS_NAME):
        root = getattr(out, "root", None)
        found = describe_folder(root) if root is not None and root.is_dir() else None
        if out.exists(MANIFEST_NAME):
            found = f"{out_url} is a finalized shard set already (its {MANIFEST_NAME} is there): nothing to do"
        raise FileNotFoundError(
            found
            or f"{out_url} holds no prepared shards ({OPTIONS_NAME} is missing): "
            f"finalize takes the --out of `python -m data_prep shard`"
        )
    return out, json.loads(out.read(OPTIONS_NAME))


def finalize(out_url: str) -> dict:
    """Writes manifest.json once every planned shard has its record (what the last task does by itself)."""
    out, options = prepared_output(out_url)
    listing = read_listing(out)
    if listing is None:
        raise FileNotFoundError(f"{out_url} holds no source listing ({LISTING_NAME} is missing)")
    listing = set_aside_small_classes(listing, options.get("min_images_per_class", 0))
    synsets = parse_layout(out.read("synsets.txt").decode(), f"{out_url}/synsets.txt")
    plan = plan_shards(
        listing, options["seed"], options["holdout_per_class"], options["max_samples"], options["max_bytes"]
    )
    manifest = build_manifest(out, plan, options, synsets, listing.rejected, listing.set_aside)
    write_finished_set(out, manifest)
    return manifest


def write_finished_set(out, manifest: dict) -> None:
    """Finishes a set: its split indexes, then the manifest that marks it finished.

    The per-split indexes, then manifest.json (listing them with their sha256): written last, since a set
    without a manifest is unfinished for every reader."""
    manifest["split_indexes"] = write_split_indexes(out, manifest["shards"])
    write_manifest(out, manifest)


def slurm_task_defaults() -> tuple[int, int]:
    """(task index, task count) of this Slurm array task; (0, 1) outside an array.

    (task index, task count) of a Slurm array task: its position in the array's range, which need not start
    at 0 nor step by 1 (--array=1-8, --array=0-126:2). A list of ids (--array=1,3,7) has no position."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    step, count = int(env.get("SLURM_ARRAY_TASK_STEP", "1")), int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    last = int(env.get("SLURM_ARRAY_TASK_MAX", first + step * (count - 1)))
    if (last - first) // step + 1 != count:
        raise PlanError(
            f"the Slurm array must be a range (like 0-63, 0-63%8 or 0-126:2), not a list of ids: "
            f"{count} tasks between {first} and {last}; or pass --task-index and --num-tasks"
        )
    return (task - first) // step, count
