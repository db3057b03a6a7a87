"""pipeline.data.order: disjoint, equal, reshuffled each epoch, and a pure function of its arguments."""
import numpy as np
import pytest

from pipeline.data.order import epoch_order, samples_per_rank

SIZES = [300, 300, 300, 300, 300, 247, 17]  # shards that divide nothing evenly


def pairs(order):
    return list(zip(order.shard.tolist(), order.sample.tolist(), strict=True))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
def test_ranks_get_equal_disjoint_slices(world):
    orders = [epoch_order(SIZES, seed=5, epoch=2, rank=r, world=world, window=100) for r in range(world)]
    n = sum(SIZES) // world
    assert [len(o) for o in orders] == [n] * world == [samples_per_rank(SIZES, world)] * world
    seen = [p for o in orders for p in pairs(o)]
    assert len(seen) == len(set(seen)) == n * world
    for shard, sample in seen:
        assert 0 <= sample < SIZES[shard]


def test_an_epoch_is_a_pure_function_and_each_epoch_differs():
    a = pairs(epoch_order(SIZES, 1, 0, 0, 2))
    assert a == pairs(epoch_order(SIZES, 1, 0, 0, 2))
    assert a != pairs(epoch_order(SIZES, 1, 1, 0, 2)) and a != pairs(epoch_order(SIZES, 2, 0, 0, 2))


def test_over_epochs_every_sample_is_read():
    seen = set()
    for epoch in range(6):
        for rank in range(3):
            seen.update(pairs(epoch_order(SIZES, 0, epoch, rank, 3)))
    assert len(seen) == sum(SIZES)  # the few left out of one epoch are read in another


def test_windows_keep_reads_local_but_mixed():
    order = epoch_order(SIZES, 3, 0, 0, 1, window=600)
    for start in range(0, len(order), 600):
        assert len(set(order.shard[start:start + 600].tolist())) <= 4  # 600 samples touch at most 4 shards here
    assert len(set(order.shard[:50].tolist())) >= 2  # and mixes them


def test_no_shuffle_is_the_manifest_order():
    order = epoch_order(SIZES, 0, 0, 0, 1, shuffle=False)
    assert order.shard[:3].tolist() == [0, 0, 0] and order.sample[:3].tolist() == [0, 1, 2]
    assert np.all(np.diff(order.shard) >= 0)
