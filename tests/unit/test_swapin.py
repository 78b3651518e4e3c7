"""The rules of a fault (core/swapin.py), without C: how a fault is served,
readahead streams and windows, which pages a fault brings, and what a
finished load does to the page map."""
import numpy as np
import pytest

from uffdsrv.core import swapin
from uffdsrv.core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.slots import Slots
from uffdsrv.core.swapin import MAX_READAHEAD, Model, Streams

BASE = 0x10000000


@pytest.mark.parametrize("state,batch,wp,kind", [
    (EMPTY, 0, False, swapin.ZERO),
    (RESIDENT, 0, False, swapin.ZERO),
    (SWAPPED, 0, False, swapin.SWAP),
    (LOADING, 0, False, swapin.WAIT),
    (INFLIGHT, 0, False, swapin.HAND),
    (SWAPPED, 3, False, swapin.HAND),
    (EMPTY, 3, False, swapin.HAND),
    (RESIDENT, 0, True, swapin.UNPROTECT),
    (EMPTY, 0, True, swapin.UNPROTECT),
    (INFLIGHT, 2, True, swapin.HAND),
    (SWAPPED, 0, True, swapin.HAND),
])
def test_classify(state, batch, wp, kind):
    assert swapin.classify(state, batch, wp) == kind


def addr(i: int) -> int:
    return BASE + i * PAGE


def test_sequential_window_doubles_up_to_the_maximum():
    s = Streams()
    at, windows = 0, []
    for _ in range(8):
        _, w = s.fault(1, addr(at))
        windows.append(w)
        at += w
    assert windows == [1, 2, 4, 8, 16, 32, 32, 32]
    assert max(windows) == MAX_READAHEAD
    assert s.misses == 0


def test_random_access_gets_no_readahead():
    s = Streams()
    rng = np.random.default_rng(5)
    ws = [s.fault(1, addr(int(i) * 97))[1] for i in rng.permutation(1000)[:200]]
    assert set(ws) == {1}


def test_two_interleaved_streams_both_get_readahead():
    s = Streams()
    a, b, wa, wb = 0, 5000, [], []
    for _ in range(6):
        _, w = s.fault(1, addr(a))
        wa.append(w)
        a += w
        _, w = s.fault(1, addr(b))
        wb.append(w)
        b += w
    assert wa == wb == [1, 2, 4, 8, 16, 32]


def test_streams_are_per_thread():
    s = Streams()
    s.fault(1, addr(0))
    assert s.fault(2, addr(1))[1] == 1  # another thread at thread 1's next page
    assert s.fault(1, addr(1))[1] == 2


def test_a_fault_a_little_past_the_stream_still_follows_it():
    s = Streams()
    s.fault(1, addr(0))
    s.fault(1, addr(1))                    # window 2: next is page 3
    assert s.fault(1, addr(4))[1] == 4     # page 3 was never reclaimed: stepped over
    assert s.fault(1, addr(8 + 4))[1] == 1  # more than a window past: a new stream


def test_replaced_stream_counts_its_unwalked_readahead_as_misses():
    s = Streams(n=2)
    k, _ = s.fault(1, addr(0))
    k, w = s.fault(1, addr(1))
    s.brought(k, w - 1)                    # brought page 2 along
    s.fault(1, addr(1000))                 # second stream
    assert s.misses == 0
    s.fault(1, addr(2000))                 # replaces the oldest: the first
    assert s.misses == 1
    # a stream confirmed by its next fault has no misses
    s2 = Streams(n=1)
    k, _ = s2.fault(1, addr(0))
    k, w = s2.fault(1, addr(1))
    s2.brought(k, w - 1)
    s2.fault(1, addr(3))
    s2.fault(1, addr(500))
    assert s2.misses == 0


def test_lru_replacement_order():
    s = Streams(n=3)
    ks = [s.fault(1, addr(i * 100))[0] for i in range(3)]
    assert sorted(ks) == [0, 1, 2]
    s.fault(1, addr(1))                    # touches the first stream
    k, _ = s.fault(1, addr(900))           # replaces the least recently used: the second
    assert k == ks[1]


def test_bring_steps_over_holes_and_batch_held_pages():
    state = np.full(12, SWAPPED, np.uint8)
    batch = np.zeros(12, np.int32)
    state[2] = RESIDENT
    state[3] = EMPTY
    batch[5] = 4
    state[6] = LOADING
    assert swapin.bring(state, batch, 0, 8).tolist() == [0, 1, 4, 7]
    assert swapin.bring(state, batch, 9, 32).tolist() == [9, 10, 11]  # stops at the end
    assert swapin.bring(state, batch, 0, 1).tolist() == [0]


def test_read_runs_follow_slots_not_addresses():
    assert swapin.read_runs(np.array([7, 8, 9, 3, 4, 20])) == [(0, 3), (3, 2), (5, 1)]
    assert swapin.read_runs(np.array([5])) == [(0, 1)]


def region_with(slots_of: dict, n: int = 16):
    pages = PageMap()
    r = pages.add(BASE, BASE + n * PAGE)
    sl = Slots(64)
    for i, s in slots_of.items():
        r.state[i], r.slot[i] = SWAPPED, s
        sl.refs[s] = 1
    sl.used = len(slots_of)
    return pages, r, sl


def test_begin_load_pins_slots():
    pages, r, sl = region_with({0: 10, 1: 11})
    got = swapin.begin_load(r, np.array([0, 1]), sl)
    assert got.tolist() == [10, 11]
    assert r.state[:2].tolist() == [LOADING, LOADING]
    assert sl.refs[10] == sl.refs[11] == 2


def test_loaded_commits_pages_and_frees_slots():
    pages, r, sl = region_with({0: 10, 1: 11, 2: 30, 4: 31})
    r.heat[0] = 6
    idx = np.array([0, 1, 2, 4])
    got = swapin.begin_load(r, idx, sl)
    addrs = BASE + idx * PAGE
    where = swapin.still_loading(pages, addrs, got)
    assert swapin.copy_runs(addrs, where) == [(0, 3), (3, 1)]
    frees, back = swapin.loaded(pages, sl, addrs, got, where, [True] * 4, now=77)
    assert frees == [(addr(0), 3), (addr(4), 1)]
    assert back == []
    assert r.state[[0, 1, 2, 4]].tolist() == [RESIDENT] * 4
    assert (r.slot[[0, 1, 2, 4]] == -1).all()
    assert r.heat[0] == 7                   # the faulting page warms
    assert r.heat[[1, 2, 4]].tolist() == [7, 7, 7]  # read ahead: as hot as it
    assert (r.stamp[[0, 1, 2, 4]] == 77).all()
    assert not sl.refs.any() and sl.used == 0


def test_a_page_removed_while_loading_is_not_copied():
    pages, r, sl = region_with({0: 10, 1: 11, 2: 12})
    idx = np.array([0, 1, 2])
    got = swapin.begin_load(r, idx, sl)
    freed = pages.remove(addr(1), addr(2), sl)  # the program's MADV_DONTNEED
    assert freed == [(addr(1), 1)]
    assert sl.refs[11] == 1                     # only the pin holds it now
    addrs = BASE + idx * PAGE
    where = swapin.still_loading(pages, addrs, got)
    assert where[1] is None
    assert swapin.copy_runs(addrs, where) == [(0, 1), (2, 1)]
    frees, back = swapin.loaded(pages, sl, addrs, got, where, [True, False, True], now=1)
    assert frees == [(addr(0), 1), (addr(2), 1)]
    assert r.state[:3].tolist() == [RESIDENT, EMPTY, RESIDENT]
    assert r.slot[1] == -1
    assert not sl.refs.any() and sl.used == 0 and sl.counters[1] <= 10


def test_an_unmapped_page_and_a_copy_that_failed():
    pages, r, sl = region_with({0: 10, 1: 11, 2: 12, 3: 13})
    idx = np.array([0, 1, 2, 3])
    got = swapin.begin_load(r, idx, sl)
    pages.drop(addr(3), addr(4), sl)            # munmap of the last page
    addrs = BASE + idx * PAGE
    where = swapin.still_loading(pages, addrs, got)
    assert where[3] is None
    r = pages.find(addr(0))[0]
    # EAGAIN after the first page: the rest goes back to SWAPPED
    frees, back = swapin.loaded(pages, sl, addrs, got, where, [True, False, False, False], 1)
    assert frees == [(addr(0), 1)]
    assert back == [1, 2]
    assert r.state[:3].tolist() == [RESIDENT, SWAPPED, SWAPPED]
    assert sl.refs[11] == sl.refs[12] == 1 and sl.refs[13] == 0 and sl.refs[10] == 0


def test_load_failed_puts_pages_back():
    pages, r, sl = region_with({0: 10, 1: 11})
    got = swapin.begin_load(r, np.array([0, 1]), sl)
    swapin.load_failed(pages, sl, BASE + np.array([0, 1]) * PAGE, got)
    assert r.state[:2].tolist() == [SWAPPED, SWAPPED]
    assert sl.refs[10] == sl.refs[11] == 1


def test_restore_does_not_warm():
    pages, r, sl = region_with({0: 10, 1: 11})
    r.heat[:2] = [2, 9]
    got = swapin.begin_load(r, np.array([0, 1]), sl)
    addrs = BASE + np.array([0, 1]) * PAGE
    where = swapin.still_loading(pages, addrs, got)
    swapin.loaded(pages, sl, addrs, got, where, [True, True], 5, fault=False)
    assert r.heat[:2].tolist() == [2, 9]


def test_zeroed_and_written():
    pages, r, sl = region_with({})
    swapin.zeroed(r, 0, 9)
    assert r.state[0] == RESIDENT and r.stamp[0] == 9
    r.heat[1] = 255
    swapin.written(r, 1, 4)
    assert r.state[1] == RESIDENT and r.heat[1] == 255


def test_model_sequential_walk_reads_in_doubling_windows():
    pages, r, sl = region_with({i: 40 - i for i in range(40)}, n=40)
    m = Model(pages, sl)
    faults = 0
    for i in range(40):
        if r.state[i] == SWAPPED:
            assert m.fault(addr(i), tid=3) == swapin.SWAP
            m.complete()
            faults += 1
    assert faults == 6  # 1 + 2 + 4 + 8 + 16 + 9
    assert (r.state == RESIDENT).all() and not sl.refs.any()
    assert sum(n for _, n in m.frees) == 40
