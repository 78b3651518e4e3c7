"""The reclaim policy (core/policy.py): which resident pages go next, by
address (pick) or by heat and age (choose), and how heat decays."""
import numpy as np
import pytest

from uffdsrv.core.pages import PAGE, RESIDENT, PageMap
from uffdsrv.core.policy import age, choose, pick

from ..support import page_map, region

A, B, C = 0x10000, 0x100000, 0x200000


def picked(pm, limit, cursor=0):
    r, idx = pick(pm, limit, cursor)
    assert idx.dtype == np.int64
    return (None if r is None else r.start), idx.tolist()


# regions: (start, spec) as tests/support.py reads it: R resident, S swapped,
# E empty, H resident but held by a batch
@pytest.mark.parametrize("regions, limit, cursor, want", [
    # nothing to pick
    ([], 4, 0, (None, [])),
    ([(A, "RRRR")], 0, 0, (None, [])),
    ([(A, "SSEE"), (B, "ESSE")], 4, 0, (None, [])),
    ([(A, "HHHH")], 4, 0, (None, [])),
    # resident pages only, batch-held skipped, address order, up to limit
    ([(A, "RSRERHR")], 10, 0, (A, [0, 2, 4, 6])),
    ([(A, "RSRERHR")], 2, 0, (A, [0, 2])),
    # one region per call even when the limit is not reached
    ([(A, "RR"), (B, "RRRR")], 10, 0, (A, [0, 1])),
    # a region with nothing resident is passed over
    ([(A, "SSSS"), (B, "SRSR")], 10, 0, (B, [1, 3])),
    # cursor inside a region: from there on
    ([(A, "RRRRRRRR")], 3, A + 4 * PAGE, (A, [4, 5, 6])),
    # cursor at a region's end or between regions: the next region
    ([(A, "RRRR"), (B, "RRRR")], 2, A + 4 * PAGE, (B, [0, 1])),
    ([(A, "RRRR"), (B, "RRRR")], 2, 0x50000, (B, [0, 1])),
    # cursor past the last region: wraps to the first
    ([(A, "RRRR"), (B, "RRRR")], 2, C, (A, [0, 1])),
    ([(A, "SSRR"), (B, "SSSS")], 8, B + 2 * PAGE, (A, [2, 3])),
    # a single region wraps to its own start
    ([(A, "RRSSSS")], 8, A + 3 * PAGE, (A, [0, 1])),
])
def test_pick(regions, limit, cursor, want):
    assert picked(page_map(*regions), limit, cursor) == want


@pytest.mark.parametrize("regions, cursor, want", [
    # nothing left after the cursor in A: B comes next in address order
    ([(A, "RRSS"), (B, "RRRR")], A + 2 * PAGE, (B, [0, 1, 2, 3])),
    # nothing left after the cursor in the last region: wrap to the first region
    ([(A, "RRRR"), (B, "RRSS")], B + 2 * PAGE, (A, [0, 1, 2, 3])),
])
def test_pick_moves_on_to_next_region_before_wrapping(regions, cursor, want):
    assert picked(page_map(*regions), 8, cursor) == want


def test_pick_does_not_change_the_map():
    pm = page_map((A, "RRHS"))
    before = [a.copy() for a in (pm.regions[0].state, pm.regions[0].batch)]
    pick(pm, 4, 0)
    assert pm.regions[0].state.tolist() == before[0].tolist()
    assert pm.regions[0].batch.tolist() == before[1].tolist()


def test_cursor_walk_covers_every_region_in_order():
    """What the reclaim loop does: advance the cursor past each pick."""
    pm = page_map((A, "RRR"), (B, "RR"), (C, "R"))
    cursor, seen = A + PAGE, []
    for _ in range(6):
        r, idx = pick(pm, 2, cursor)
        seen.append((r.start, idx.tolist()))
        cursor = r.start + (int(idx[-1]) + 1) * PAGE
    assert seen == [(A, [1, 2]), (B, [0, 1]), (C, [0]), (A, [0, 1]), (A, [2]), (B, [0, 1])]


# --- choose: heat, age, the order of arrival ---------------------------------------
def test_fifo_takes_the_longest_resident_first():
    pm = PageMap()
    region(pm, "RRRRS", B, stamp=[50, 10, 40, 20, 0])
    assert choose(pm, 2, "fifo")[1].tolist() == [1, 3]


def test_coldest_spares_pages_that_came_back():
    pm = PageMap()
    region(pm, "RRRR", B, heat=[3, 0, 1, 0], stamp=[1, 4, 2, 3])
    assert choose(pm, 3, "coldest")[1].tolist() == [1, 2, 3]
    assert choose(pm, 1, "coldest")[1].tolist() == [3]


def test_random_takes_resident_pages_only():
    pm = page_map((B, "RSRSRS"))
    got = choose(pm, 10, "random", np.random.default_rng(1))[1]
    assert sorted(got.tolist()) == [0, 2, 4]


def test_a_batch_takes_one_region_the_one_with_most_picks():
    pm = PageMap()
    a = pm.add(0x100000, 0x100000 + 4 * PAGE)
    b = pm.add(0x200000, 0x200000 + 4 * PAGE)
    a.state[:] = b.state[:] = RESIDENT
    a.stamp[:] = [1, 100, 100, 100]
    b.stamp[:] = [2, 3, 4, 100]
    r, idx = choose(pm, 4, "fifo")
    assert r is b and idx.tolist() == [0, 1, 2]


def test_age_halves_heat():
    pm = PageMap()
    r = region(pm, "RRR", B, heat=[255, 3, 1])
    age(pm)
    assert r.heat.tolist() == [127, 1, 0]
