"""The page map: lookup, and the events that keep it true (REMOVE, UNMAP,
REMAP, FORK, exit), with exact states and slot reference counts."""
import numpy as np
import pytest

from uffdsrv.core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.slots import Slots

from ..support import A, region, states


def layout(pm: PageMap):
    return [(r.start, states(r), r.slot.tolist()) for r in pm.regions]


# --- lookup -------------------------------------------------------------------------
def test_add_find_overlapping_gaps():
    pm = PageMap()
    b = pm.add(A + 16 * PAGE, A + 20 * PAGE)
    a = pm.add(A, A + 4 * PAGE, present=np.array([True, False, True, False]))
    assert [r.start for r in pm.regions] == [A, A + 16 * PAGE] and pm._starts == [A, A + 16 * PAGE]
    assert states(a) == "RERE" and states(b) == "EEEE"
    assert a.slot.tolist() == [-1] * 4 and a.end == A + 4 * PAGE
    assert pm.managed_pages == 8 and pm.count(RESIDENT) == 2 and pm.count(EMPTY) == 6
    assert pm.find(A) == (a, 0)
    assert pm.find(A + 4 * PAGE - 1) == (a, 3)
    assert pm.find(A + 4 * PAGE) == (None, -1)
    assert pm.find(A - 1) == (None, -1)
    assert pm.find(A + 17 * PAGE + 5) == (b, 1)
    assert pm.overlapping(A + 2 * PAGE, A + 17 * PAGE) == [(a, 2, 4), (b, 0, 1)]
    assert pm.overlapping(A + 5 * PAGE, A + 16 * PAGE) == []
    assert pm.gaps(0, A + 30 * PAGE) == [(0, A), (A + 4 * PAGE, A + 16 * PAGE),
                                          (A + 20 * PAGE, A + 30 * PAGE)]
    assert pm.gaps(A + PAGE, A + 3 * PAGE) == []


def test_not_present_counts_what_an_unregister_would_turn_into_zeros():
    pm = PageMap()
    a = pm.add(A, A + 6 * PAGE, present=np.ones(6, dtype=bool))
    b = pm.add(A + 8 * PAGE, A + 10 * PAGE)
    a.state[1], a.state[3], a.state[4] = SWAPPED, LOADING, INFLIGHT
    b.state[1] = SWAPPED
    assert pm.not_present(A, A + 10 * PAGE) == 4
    assert pm.not_present(A, A + PAGE) == 0  # resident
    assert pm.not_present(A + 2 * PAGE, A + 4 * PAGE) == 1  # loading only
    assert pm.not_present(A + 5 * PAGE, A + 9 * PAGE) == 0  # resident, a gap, empty


@pytest.mark.parametrize("lo, hi", [(0, 1), (3, 4), (-1, 1), (2, 8), (-2, 10)])
def test_add_refuses_overlap(lo, hi):
    pm = PageMap()
    pm.add(A, A + 4 * PAGE)
    with pytest.raises(ValueError):
        pm.add(A + lo * PAGE, A + hi * PAGE)
    assert len(pm.regions) == 1


# --- the program's own REMOVE ---------------------------------------------------------
def test_program_remove_frees_swapped_and_loading_pages():
    slots, pm = Slots(16), PageMap()
    r = region(pm, "RSSLSE", A, slots)
    assert r.slot.tolist() == [-1, 0, 1, 2, 3, -1] and slots.used == 4
    pm.remove(A, A + 4 * PAGE, slots)
    assert states(r) == "EEEESE"
    assert r.slot.tolist() == [-1, -1, -1, -1, 3, -1]
    assert slots.refs[:4].tolist() == [0, 0, 0, 1] and slots.used == 1
    assert r.expect.tolist() == [0] * 6


def test_program_remove_across_regions_and_gaps():
    slots, pm = Slots(16), PageMap()
    a = region(pm, "SS", A, slots)
    b = region(pm, "SS", A + 4 * PAGE, slots)
    pm.remove(A + PAGE, A + 5 * PAGE, slots)
    assert (states(a), states(b)) == ("SE", "ES")
    assert slots.refs[:4].tolist() == [1, 0, 0, 1] and slots.used == 2


def test_remove_of_unmanaged_range_changes_nothing():
    slots, pm = Slots(4), PageMap()
    r = region(pm, "SR", A, slots)
    pm.remove(A + 2 * PAGE, A + 8 * PAGE, slots)
    assert states(r) == "SR" and slots.used == 1


# --- drop (munmap) -------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi, want, freed", [
    (3, 6, [(A, "SSS"), (A + 6 * PAGE, "SS")], [3, 4, 5]),     # middle: split in two
    (0, 2, [(A + 2 * PAGE, "SSSSSS")], [0, 1]),                 # head
    (6, 8, [(A, "SSSSSS")], [6, 7]),                             # tail
    (-4, 20, [], list(range(8))),                                # all of it
])
def test_drop_splits_and_frees_only_the_dropped_slots(lo, hi, want, freed):
    slots, pm = Slots(16), PageMap()
    region(pm, "SSSSSSSS", A, slots)
    pm.drop(A + lo * PAGE, A + hi * PAGE, slots)
    assert [(s, st) for s, st, _ in layout(pm)] == want
    assert pm._starts == [s for s, _ in want]
    for start, _, sl in layout(pm):
        assert sl == [(start - A) // PAGE + i for i in range(len(sl))]
    assert np.flatnonzero(slots.refs[:8] == 0).tolist() == freed
    assert slots.used == 8 - len(freed)


def test_drop_keeps_per_page_fields_of_the_parts():
    slots, pm = Slots(16), PageMap()
    r = region(pm, "RSLE", A, slots)
    r.expect[:] = [0, 1, 0, 0]
    r.batch[:] = [0, 7, 0, 0]
    pm.drop(A + PAGE * 2, A + PAGE * 3, slots)
    head, tail = pm.regions
    assert (states(head), head.slot.tolist(), head.expect.tolist(), head.batch.tolist()) == \
        ("RS", [-1, 0], [0, 1], [0, 7])
    assert (states(tail), tail.start, tail.slot.tolist()) == ("E", A + 3 * PAGE, [-1])
    # the LOADING page was region-owned: freed; slot 0 is held by batch 7: kept
    assert slots.refs[:2].tolist() == [1, 0] and slots.used == 1


def test_drop_without_release_keeps_slots():
    slots, pm = Slots(4), PageMap()
    region(pm, "SS", A, slots)
    pm.drop(A, A + 2 * PAGE, slots, release=False)
    assert pm.regions == [] and slots.used == 2


# --- remap ---------------------------------------------------------------------------
def test_remap_moves_states_and_slots_and_drops_the_destination():
    slots, pm = Slots(16), PageMap()
    region(pm, "RSSL", A, slots)                       # slots 0, 1, 2
    dst = A + 0x100000
    region(pm, "SSS", dst - PAGE, slots)               # slots 3, 4, 5: 4 and 5 at dst
    pm.remap(A + PAGE, dst, 3 * PAGE, slots)
    # the page being loaded arrives swapped: its swap-in was for the old
    # address, and a page left LOADING would wait for a COPY that never comes
    assert layout(pm) == [(A, "R", [-1]), (dst - PAGE, "S", [3]), (dst, "SSS", [0, 1, 2])]
    assert slots.refs[:6].tolist() == [1, 1, 1, 1, 0, 0] and slots.used == 4
    assert pm.find(dst + 2 * PAGE)[0].start == dst


# --- fork and exit -------------------------------------------------------------------
def test_fork_shares_slots_and_release_all_frees_them():
    slots, pm = Slots(16), PageMap()
    r = region(pm, "ERSLI", A, slots)
    r.slot[4] = 9
    slots.ref(np.array([1]))  # the read of a LOADING page pins its slot
    r.batch[4] = 3
    r.expect[4] = 1
    child = pm.fork(slots)
    c = child.regions[0]
    assert c is not r and c.state is not r.state
    assert (states(c), c.slot.tolist()) == ("ERSSR", [-1, -1, 0, 1, -1])
    assert c.expect.tolist() == [0] * 5 and c.batch.tolist() == [0] * 5
    assert states(r) == "ERSLI"  # the parent is unchanged
    assert slots.refs[:2].tolist() == [2, 3]
    pm.release_all(slots)
    assert pm.regions == [] and pm._starts == []
    assert slots.refs[:2].tolist() == [1, 2]
    child.release_all(slots)
    assert slots.refs[:2].tolist() == [0, 1] and slots.used == 1


def test_release_all_returns_used_to_zero():
    slots, pm = Slots(16), PageMap()
    region(pm, "SSRL", A, slots)
    region(pm, "ESS", A + 0x10000, slots)
    child = pm.fork(slots)
    assert slots.used == 5 and slots.refs[:5].tolist() == [2] * 5
    pm.release_all(slots)
    assert slots.used == 5
    child.release_all(slots)
    assert slots.used == 0 and not slots.refs.any()


def test_states_at_reads_across_regions_and_marks_holes():
    from uffdsrv.core.pages import EMPTY, PAGE, RESIDENT, PageMap
    pm = PageMap()
    a = pm.add(0x100000, 0x100000 + 2 * PAGE)
    b = pm.add(0x100000 + 3 * PAGE, 0x100000 + 4 * PAGE)
    a.state[:] = [RESIDENT, SWAPPED]
    b.state[:] = [EMPTY]
    addrs = 0x100000 + np.arange(4) * PAGE
    assert pm.states_at(addrs).tolist() == [RESIDENT, SWAPPED, 255, EMPTY]
    assert pm.states_at(np.zeros(0)).tolist() == []
