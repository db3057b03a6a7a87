"""Per-shard completion records, and the manifest built from them once every shard has one.

Per-shard completion records (`_prep/done/*.json`, one per finished shard) and the manifest built from them
once every planned shard has one."""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from swin_common.errors import UserError

from .plan import RECORDS_DIR, task_share
from .shardset.manifest import FORMAT

log = logging.getLogger(__name__)


class Planned(Protocol):
    """A planned shard (plan.ShardSpec, foreign.IndexSpec): its name and the name of its completion record."""

    @property
    def name(self) -> str: ...

    @property
    def record_name(self) -> str: ...


S = TypeVar("S", bound=Planned)


class IncompleteError(UserError, RuntimeError):
    """A shard set whose planned shards are not all written yet."""


def missing_records(out, plan: list[S]) -> list[S]:
    """Planned shards without a completion record, from one listing.

    Planned shards without a completion record: one listing of _prep/done (a few paginated LISTs on S3 for
    14,000 shards) rather than a request per shard."""
    done = {rel for rel, _size in out.list(RECORDS_DIR)}
    return [spec for spec in plan if spec.record_name not in done]


def task_todo(out, plan: list[S], task_index: int, num_tasks: int, verb: str) -> tuple[list[S], list[S]]:
    """(this task's shards, those of them still without a record), said in one log line (`verb`: what is left
    to do to them, e.g. "write")."""
    mine = task_share(plan, task_index, num_tasks)
    todo = missing_records(out, mine)
    log.info(
        "task %d/%d: %d of %d shards are this task's, %d already done, %d to %s",
        task_index,
        num_tasks,
        len(mine),
        len(plan),
        len(mine) - len(todo),
        len(todo),
        verb,
    )
    return mine, todo


def read_records(out, plan: list[Any]) -> list[dict]:
    """Every planned shard's completion record, in plan order; IncompleteError naming those not finished."""
    missing = missing_records(out, plan)
    if missing:
        names = ", ".join(s.name for s in missing[:10])
        raise IncompleteError(
            f"{len(missing)} of {len(plan)} shards are not finished yet ({names}"
            f"{' ...' if len(missing) > 10 else ''}); run the remaining tasks, then finalize"
        )
    with ThreadPoolExecutor(16) as pool:  # S3: one GET each, overlapped
        return [json.loads(data) for data in pool.map(out.read, [spec.record_name for spec in plan])]


def build_manifest(
    out,
    plan: list[Any],
    options: dict,
    synsets: list[str],
    listing_rejected: list,
    set_aside: dict[str, int] | None = None,
    records: list[dict] | None = None,
) -> dict:
    """The manifest of a set whose planned shards all have their record (`records`, when already read)."""
    if records is None:
        records = read_records(out, plan)
    totals: dict[str, dict[str, int]] = {}  # split -> shards, samples, bytes
    per_class: dict[str, Counter[str]] = {}  # split -> synset -> samples
    rejected = [{"source": p, "reason": r} for p, r in listing_rejected]
    converted: Counter[str] = Counter()  # reason -> images
    for rec in records:
        t = totals.setdefault(rec["split"], {"shards": 0, "samples": 0, "bytes": 0})
        t["shards"] += 1
        t["samples"] += rec["samples"]
        t["bytes"] += rec["bytes"]
        counts = per_class.setdefault(rec["split"], Counter())
        for label, n in rec["class_counts"].items():
            counts[synsets[int(label)]] += n
        rejected += [{"source": p, "reason": r} for p, r in rec["rejected"]]
        converted.update(reason for _p, reason in rec.get("converted", ()))
    rejected.sort(key=lambda r: r["source"])
    return {
        "format": FORMAT,
        "sample": {
            "__key__": "unique id",
            "jpg": "RGB JPEG",
            "cls": "label, ascii int",
            "json": "synset, source, width, height",
        },
        "options": options,
        "label_layout": {"file": "synsets.txt", "num_classes": len(synsets), "synsets": synsets},
        "totals": totals,
        "shards": [
            {
                "name": r["name"],
                "index": r["index"],
                "split": r["split"],
                "samples": r["samples"],
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                **({"labels": r["labels"]} if "labels" in r else {}),  # a set indexed in place: its labels file
            }
            for r in records
        ],
        "class_counts": {split: {s: c[s] for s in synsets if c[s]} for split, c in per_class.items()},
        "rejected": rejected,
        "converted": dict(sorted(converted.items())),
        "set_aside_classes": dict(sorted((set_aside or {}).items())),  # --min-images-per-class: images listed
    }
