"""Swap slot allocator: first-fit runs, clusters when fragmented, reference
counts, the counters the native engine shares."""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from uffdsrv.core.slots import CLUSTER, Slots


def refs(s: Slots) -> list[int]:
    return s.refs.tolist()


@pytest.mark.parametrize("n, want, used", [
    (0, [], 0),
    (-3, [], 0),
    (1, [0], 1),
    (3, [0, 1, 2], 3),
    (8, list(range(8)), 8),
    (20, list(range(8)), 8),  # fewer when the file is nearly full
])
def test_alloc_lowest_first(n, want, used):
    s = Slots(8)
    got = s.alloc(n)
    assert got.dtype == np.int64
    assert got.tolist() == want
    assert s.used == used and s.free == 8 - used
    assert refs(s) == [1] * used + [0] * (8 - used)


def test_alloc_when_full_returns_empty():
    s = Slots(4)
    s.alloc(4)
    assert s.alloc(2).tolist() == []
    assert s.used == 4 and s.free == 0


def test_first_fit_takes_the_lowest_run_that_fits():
    s = Slots(16)
    s.alloc(10)
    s.release(np.array([1, 3, 4, 5]))  # free runs: [1], [3..5], [10..15]
    assert s.alloc(3).tolist() == [3, 4, 5]   # not the holes 1, 3, 4
    assert s.alloc(2).tolist() == [10, 11]    # the run at 1 is too short
    assert s.alloc(1).tolist() == [1]         # the low end is reused
    assert s.used == 16 - 4
    assert refs(s) == [1] * 12 + [0] * 4


def test_fragmented_file_fills_lowest_holes():
    s = Slots(16)
    s.alloc(16)
    s.release(np.arange(0, 16, 2))  # every other slot: no run of 2 anywhere
    assert s.alloc(3).tolist() == [0, 2, 4]
    assert s.alloc(8).tolist() == [6, 8, 10, 12, 14]  # fewer: the file is full
    assert s.free == 0 and s.alloc(1).tolist() == []


def test_no_run_fits_whole_free_clusters_go_first():
    s = Slots(3 * CLUSTER)
    s.alloc(3 * CLUSTER)
    holes = np.arange(0, CLUSTER, 2)              # cluster 0: every other slot
    s.release(holes)
    s.release(np.arange(2 * CLUSTER, 3 * CLUSTER))  # cluster 2: wholly free
    n = CLUSTER + 40                              # more than any run
    got = s.alloc(n)
    assert got[:CLUSTER].tolist() == list(range(2 * CLUSTER, 3 * CLUSTER))
    assert got[CLUSTER:].tolist() == holes[:40].tolist()
    assert s.used == 3 * CLUSTER - len(holes) + 40
    assert int(s.counters[1]) == int(holes[40])


def test_run_across_the_search_window_is_found_whole():
    # a run that begins just below the end of the first window looked at
    s = Slots(1 << 18)
    s.alloc(1 << 18)
    s.release(np.arange(60000, 70000))
    s.release(np.arange(100, 110))
    assert s.alloc(9000).tolist() == list(range(60000, 69000))
    assert s.alloc(10).tolist() == list(range(100, 110))


def region_reclaimed(s: Slots, slot: np.ndarray, idx: np.ndarray) -> None:
    """What reclaim does to a region's pages at idx: one alloc per batch,
    the slots given out in address order."""
    got = s.alloc(len(idx))
    assert len(got) == len(idx)
    slot[idx] = got


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_region_reclaimed_twice_stays_contiguous(seed):
    rng = np.random.default_rng(seed)
    s = Slots(4096)
    a = np.full(1024, -1, dtype=np.int64)   # region A's slot per page
    b = np.full(200, -1, dtype=np.int64)    # another client's region
    region_reclaimed(s, a, np.arange(1024))
    region_reclaimed(s, b, np.arange(200))
    # random fault-ins of A: their slots become scattered holes
    back = np.sort(rng.choice(1024, 300, replace=False))
    s.release(a[back])
    a[back] = -1
    # another region reclaimed meanwhile must not be spread over A's holes
    c = np.full(100, -1, dtype=np.int64)
    region_reclaimed(s, c, np.arange(100))
    assert np.all(np.diff(c) == 1), c
    # A reclaimed again: the pages that came back land in one run
    region_reclaimed(s, a, back)
    assert np.all(np.diff(a[back]) == 1), a[back]
    # everything faulted in, in random order, then reclaimed once more: the
    # whole region is one run on the device, readahead by address is one read
    s.release(a[rng.permutation(1024)])
    a[:] = -1
    region_reclaimed(s, a, np.arange(1024))
    assert np.all(np.diff(a) == 1), a
    assert s.used == 1024 + 200 + 100
    live = np.concatenate((a, b, c))
    assert len(np.unique(live)) == len(live)  # no slot in two pages


def test_ref_keeps_slot_until_last_release():
    s = Slots(4)
    a = s.alloc(2)
    s.ref(a[:1])
    s.ref(np.array([0]))
    assert refs(s) == [3, 1, 0, 0] and s.used == 2
    s.release(np.array([0, 1]))
    assert refs(s) == [2, 0, 0, 0] and s.used == 1
    s.release(np.array([0]))
    s.release(0)  # a scalar is accepted
    assert refs(s) == [0, 0, 0, 0] and s.used == 0
    assert s.alloc(1).tolist() == [0]


@pytest.mark.parametrize("op", ["ref", "release"])
def test_free_slot_is_refused(op):
    s = Slots(4)
    s.alloc(1)
    with pytest.raises(ValueError):
        getattr(s, op)(np.array([0, 2]))
    assert refs(s) == [1, 0, 0, 0] and s.used == 1  # nothing applied


@pytest.mark.parametrize("op", ["ref", "release"])
def test_minus_one_is_ignored(op):
    s = Slots(4)
    s.alloc(2)
    getattr(s, op)(np.array([-1, -1]))
    getattr(s, op)(np.array([], dtype=np.int64))
    assert refs(s) == [1, 1, 0, 0] and s.used == 2


@pytest.mark.parametrize("order", [[3, 1], [6, 2, 4], [7, 0]])
def test_release_in_any_order_frees_every_slot_once(order):
    s = Slots(8)
    s.alloc(8)
    s.release(np.array(order))
    assert int(s.counters[1]) == min(order)
    assert sorted(s.alloc(8).tolist()) == sorted(order)
    assert s.used == 8


def test_release_of_unsorted_slots_frees_them_all():
    s = Slots(8)
    s.alloc(8)
    s.release(np.array([6, 2, 4]))
    assert refs(s) == [1, 1, 0, 1, 0, 1, 0, 1] and s.used == 5 and s.free == 3


def test_over_release_in_one_call_is_refused():
    s = Slots(4)
    s.alloc(1)
    try:
        s.release(np.array([0, 0]))
    except ValueError:
        pass
    assert s.refs[0] in (0, 1)
    assert s.used == int(np.count_nonzero(s.refs))


# --- state machine: alloc / ref / release against a plain model --------------
def model_first_fit(model: list[int], n: int) -> int | None:
    run = 0
    for i, c in enumerate(model):
        run = run + 1 if c == 0 else 0
        if run == n:
            return i - n + 1
    return None


class SlotsMachine(RuleBasedStateMachine):
    @initialize(nslots=st.integers(1, 40))
    def start(self, nslots):
        self.s = Slots(nslots)
        self.model = [0] * nslots

    def held(self):
        return [i for i, c in enumerate(self.model) if c > 0]

    @rule(n=st.integers(-1, 14))
    def alloc(self, n):
        free = [i for i, c in enumerate(self.model) if c == 0]
        fit = model_first_fit(self.model, n) if n > 0 else None
        got = self.s.alloc(n).tolist()
        assert len(got) == (min(n, len(free)) if n > 0 else 0)
        assert len(set(got)) == len(got) and set(got) <= set(free)  # never a held slot
        if fit is not None:
            assert got == list(range(fit, fit + n))
        elif got:
            # no run fits: the lowest free slots (one partial cluster here)
            assert got == free[:n]
        for i in got:
            self.model[i] = 1

    @precondition(lambda self: self.held())
    @rule(pick=st.integers(0, 1000), k=st.integers(1, 4))
    def ref(self, pick, k):
        held = self.held()
        chosen = sorted({held[(pick + j * 7) % len(held)] for j in range(k)})
        self.s.ref(np.array(chosen))
        for i in chosen:
            self.model[i] += 1

    @precondition(lambda self: self.held())
    @rule(pick=st.integers(0, 1000), k=st.integers(1, 4), scalar=st.booleans())
    def release(self, pick, k, scalar):
        held = self.held()
        chosen = sorted({held[(pick + j * 7) % len(held)] for j in range(k)})
        if scalar:
            chosen = chosen[:1]
            self.s.release(int(chosen[0]))
        else:
            self.s.release(np.array(chosen[::-1]))
        for i in chosen:
            self.model[i] -= 1

    @precondition(lambda self: any(c == 0 for c in self.model))
    @rule(pick=st.integers(0, 1000))
    def refuse_free(self, pick):
        free = [i for i, c in enumerate(self.model) if c == 0]
        for op in ("ref", "release"):
            with pytest.raises(ValueError):
                getattr(self.s, op)(np.array([free[pick % len(free)]]))

    @invariant()
    def counts_agree(self):
        assert refs(self.s) == self.model
        assert self.s.used == int(self.s.counters[0]) == sum(1 for c in self.model if c > 0)
        assert self.s.free == len(self.model) - self.s.used
        # counters[1]: no free slot below it (the native engine relies on
        # it), and here exactly the lowest free slot
        low = next((i for i, c in enumerate(self.model) if c == 0), len(self.model))
        assert int(self.s.counters[1]) == low


SlotsMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)
test_slots_machine = SlotsMachine.TestCase
