"""pipeline.data.order: disjoint, equal, reshuffled each epoch, a pure function of its arguments, and one sequence
for every world size (elastic resume), with padded evaluation slices that count every sample once."""

import numpy as np
import pytest

from pipeline.data.order import epoch_order, epoch_sequence, samples_per_rank

SIZES = [300, 300, 300, 300, 300, 247, 17]  # shards that divide nothing evenly


def pairs(order):
    return list(zip(order.shard.tolist(), order.sample.tolist(), strict=True))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("batch", [1, 16])
def test_ranks_get_equal_disjoint_shares(world, batch):
    orders = [epoch_order(SIZES, seed=5, epoch=2, rank=r, world=world, window=100, batch=batch) for r in range(world)]
    n = sum(SIZES) // (world * batch) * batch
    assert [len(o) for o in orders] == [n] * world and n <= samples_per_rank(SIZES, world)
    seen = [p for o in orders for p in pairs(o)]
    assert len(seen) == len(set(seen)) == n * world
    for shard, sample in seen:
        assert 0 <= sample < SIZES[shard]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_r_reads_slots_r_r_plus_w_and_so_on_of_one_sequence(world):
    """The micro batch in slot s is G[s*m:(s+1)*m] whatever the world size: what W ranks consume after j micro
    batches each is G's first j*W*m samples, so another world size resumes from there."""
    m = 16
    shard, sample = epoch_sequence(SIZES, 5, 2, window=100)
    g = list(zip(shard.tolist(), sample.tolist(), strict=True))
    for r in range(world):
        order = epoch_order(SIZES, 5, 2, r, world, window=100, batch=m)
        for b in range(len(order) // m):
            slot = order.slot(b)
            assert slot == b * world + r and pairs(order)[b * m : (b + 1) * m] == g[slot * m : (slot + 1) * m]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_evaluation_slices_count_every_sample_once(world):
    orders = [epoch_order(SIZES, 0, 0, r, world, shuffle=False, pad=True) for r in range(world)]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == samples_per_rank(SIZES, world, pad=True)
    real = [p for o in orders for p, ok in zip(pairs(o), o.valid.tolist(), strict=True) if ok]
    assert real == pairs(epoch_order(SIZES, 0, 0, 0, 1, shuffle=False))


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
    shard, _ = epoch_sequence(SIZES, 3, 0, window=600)
    for start in range(0, len(shard), 600):
        assert len(set(shard[start : start + 600].tolist())) <= 4  # 600 samples touch at most 4 shards here
    assert len(set(shard[:50].tolist())) >= 2  # and mixes them
    # every rank reads the same stretch at a time: the first 150 samples of 2 ranks x 3 micro batches of 25 ...
    ranks = [epoch_order(SIZES, 3, 0, r, 2, window=600, batch=25) for r in range(2)]
    assert set(ranks[0].shard[:75].tolist()) | set(ranks[1].shard[:75].tolist()) <= set(shard[:150].tolist())


def test_no_shuffle_is_the_manifest_order():
    order = epoch_order(SIZES, 0, 0, 0, 1, shuffle=False)
    assert order.shard[:3].tolist() == [0, 0, 0] and order.sample[:3].tolist() == [0, 1, 2]
    assert np.all(np.diff(order.shard) >= 0)
