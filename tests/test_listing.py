"""data_prep's columnar listing and plan: the same items and the same shards as the object-per-image version,
and its cache round trip."""

import hashlib

import pytest

from data_prep.plan import plan_shards
from data_prep.shardset.store import open_store
from data_prep.sources import Listing, scan_source


@pytest.fixture(scope="module", params=["tars", "folder"])
def listing(request, digits_tars, digits_folder) -> Listing:
    return scan_source(open_store(str(digits_tars if request.param == "tars" else digits_folder)))


def items(listing: Listing) -> list:
    return [listing.item(i) for i in range(len(listing))]


def reference_plan(all_items, seed, per_class, max_samples, max_bytes):
    """The plan as the object-per-image version computed it (sorted() with a keyed hash per item)."""

    def rank(purpose, item):
        return hashlib.blake2b(f"{seed}:{purpose}:{item.path}".encode(), digest_size=8).digest()

    train, val, by_synset = [], [], {}
    if per_class > 0:
        for item in all_items:
            by_synset.setdefault(item.synset, []).append(item)
        for synset in sorted(by_synset):
            group = sorted(by_synset[synset], key=lambda it: rank("holdout", it))
            n = min(per_class, len(group) - 1)
            val += group[:n]
            train += group[n:]
    else:
        train = list(all_items)
    plan = []
    for split, part in (("train", train), ("val", val)):
        shards, current, size = [], [], 0
        for item in sorted(part, key=lambda it: rank("order", it)):
            if (max_samples and len(current) >= max_samples) or (
                max_bytes and current and size + item.size > max_bytes
            ):
                shards.append(current)
                current, size = [], 0
            current.append(item)
            size += item.size
        if current:
            shards.append(current)
        plan += [(split, i, tuple(s)) for i, s in enumerate(shards)]
    return plan


def test_items_are_sorted_by_synset_and_path_with_unique_keys(listing):
    rows = items(listing)
    assert len(rows) == 1797 and listing.synsets == [f"n{i:08d}" for i in range(10)]
    assert [(r.synset, r.path) for r in rows] == sorted((r.synset, r.path) for r in rows)
    assert len({r.key for r in rows}) == len(rows)


@pytest.mark.parametrize(
    "seed, per_class, max_samples, max_bytes",
    [(0, 0, 200, None), (1, 5, 150, None), (7, 3, 0, 60_000), (2, 10, 90, 40_000)],
)
def test_the_plan_is_the_one_the_object_version_made(listing, seed, per_class, max_samples, max_bytes):
    plan = plan_shards(listing, seed, per_class, max_samples or None, max_bytes)
    got = [(s.split, s.index, s.items) for s in plan]
    assert got == reference_plan(items(listing), seed, per_class, max_samples or None, max_bytes)


def test_the_cache_round_trips(listing, tmp_path):
    out = open_store(str(tmp_path))
    listing.save(out, "_prep/listing.npz")
    again = Listing.load(out, "_prep/listing.npz")
    assert items(again) == items(listing) and again.kind == listing.kind and again.synsets == listing.synsets


def test_setting_classes_aside_keeps_the_other_rows(listing):
    kept = listing.without_synsets({"n00000003", "n00000007"}, {"n00000003": 1, "n00000007": 2})
    assert kept.synsets == [s for s in listing.synsets if s not in ("n00000003", "n00000007")]
    assert items(kept) == [i for i in items(listing) if i.synset not in ("n00000003", "n00000007")]
    assert kept.set_aside == {"n00000003": 1, "n00000007": 2}
