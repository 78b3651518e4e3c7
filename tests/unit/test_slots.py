"""Swap slot allocator: lowest-first allocation, reference counts, free count."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsrv.core.slots import Slots


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


def test_released_slots_are_reused_lowest_first():
    s = Slots(8)
    assert s.alloc(5).tolist() == [0, 1, 2, 3, 4]
    s.release(np.array([1, 3]))
    assert s.used == 3
    assert refs(s) == [1, 0, 1, 0, 1, 0, 0, 0]
    assert s.alloc(3).tolist() == [1, 3, 5]
    assert s.used == 6
    assert s.alloc(1).tolist() == [6]


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
def test_release_in_any_order_keeps_lowest_first(order):
    s = Slots(8)
    s.alloc(8)
    s.release(np.array(order))
    assert s.alloc(8).tolist() == sorted(order)
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


# --- property: random alloc / ref / release against a plain model ------------------
ops = st.lists(st.tuples(st.sampled_from(["alloc", "ref", "release"]),
                         st.integers(0, 12), st.integers(0, 1000)), max_size=60)


@settings(max_examples=100, deadline=None)
@given(nslots=st.integers(1, 24), ops=ops)
def test_allocator_invariants(nslots, ops):
    s = Slots(nslots)
    model = [0] * nslots
    for op, n, pick in ops:
        held = [i for i, c in enumerate(model) if c > 0]
        if op == "alloc":
            free = [i for i, c in enumerate(model) if c == 0]
            got = s.alloc(n).tolist()
            assert got == free[:n]  # lowest first, never a slot with refs > 0
            for i in got:
                model[i] = 1
        elif held:
            chosen = sorted({held[(pick + k * 7) % len(held)] for k in range(1 + n % 3)})
            if op == "ref":
                s.ref(np.array(chosen))
                for i in chosen:
                    model[i] += 1
            else:
                s.release(np.array(chosen))
                for i in chosen:
                    model[i] -= 1
        assert refs(s) == model
        assert s.used == sum(1 for c in model if c > 0)
        assert s.free == nslots - s.used
