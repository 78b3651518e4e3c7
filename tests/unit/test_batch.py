"""Reclaim batches over the page map: the lifecycle the shell runs
(Batch -> set_slots -> expect_zap -> REMOVE events -> settle), the events
that can cut across it, and a model-based test of the whole."""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from uffdsrv.core import policy
from uffdsrv.core.batch import Batch, cancel_page
from uffdsrv.core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.ranges import runs
from uffdsrv.core.slots import Slots

from ..support import A, region, states


def setup(npages=8, nslots=64):
    slots, pm = Slots(nslots), PageMap()
    return slots, pm, region(pm, "R" * npages)


def written(pm, slots, r, idx, zero=()):
    """Batch, copy out, write: the pages listed in `zero` were all zeros."""
    b = Batch(r, np.array(idx, dtype=np.int64))
    live = b.inflight(pm)
    data = live[~np.isin(b.addrs[live], [A + z * PAGE for z in zero])]
    b.set_slots(pm, data, slots.alloc(len(data)))
    return b


def zap(pm, b):
    """expect_zap the live pages; -> the (start, end) ranges the zap requests."""
    live = b.inflight(pm)
    b.expect_zap(pm, live)
    first, count = runs((b.addrs[live] - A) // PAGE)
    return [(A + f * PAGE, A + (f + c) * PAGE) for f, c in zip(first.tolist(), count.tolist())]


def pg(i):
    return A + i * PAGE


def test_batch_marks_pages_inflight():
    slots, pm, r = setup()
    b = Batch(r, np.array([1, 2, 5]))
    assert len(b) == 3 and b.id > 0 and not b.zap_sent
    assert states(r) == "RIIRRIRR"
    assert r.batch.tolist() == [0, b.id, b.id, 0, 0, b.id, 0, 0]
    assert b.addrs.tolist() == [pg(1), pg(2), pg(5)]
    assert b.inflight(pm).tolist() == [0, 1, 2]
    assert Batch(r, np.array([0])).id > b.id


def test_set_slots_and_expect_zap():
    slots, pm, r = setup()
    b = written(pm, slots, r, [1, 2, 3, 5], zero=[3])
    assert b.slots.tolist() == [0, 1, -1, 2]
    assert r.slot.tolist() == [-1, 0, 1, -1, -1, 2, -1, -1]
    assert slots.used == 3 and slots.refs[:3].tolist() == [1, 1, 1]
    assert zap(pm, b) == [(pg(1), pg(4)), (pg(5), pg(6))]
    assert b.zap_sent
    assert r.expect.tolist() == [0, 1, 1, 1, 0, 1, 0, 0]


def test_our_zap_swaps_inflight_and_empties_zero_pages():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2, 3, 4, 5], zero=[2])
    for s, e in zap(pm, b):
        pm.remove(s, e, slots)
    assert states(r) == "SSESSSRR"
    assert r.slot.tolist() == [0, 1, -1, 2, 3, 4, -1, -1]
    assert r.expect.tolist() == [0] * 8
    assert slots.refs[:6].tolist() == [1, 1, 1, 1, 1, 0]  # held by the batch, once
    assert b.settle(pm, slots).tolist() == []
    assert states(r) == "SSESSSRR" and r.batch.tolist() == [0] * 8
    assert slots.refs[:6].tolist() == [1, 1, 1, 1, 1, 0] and slots.used == 5  # now the region's
    assert b.slots.tolist() == [-1] * 6


def test_program_remove_frees_swapped_slots():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2, 3])
    for s, e in zap(pm, b):
        pm.remove(s, e, slots)
    b.settle(pm, slots)
    pm.remove(pg(1), pg(3), slots)
    assert states(r) == "SEESRRRR"
    assert r.slot.tolist()[:4] == [0, -1, -1, 3]
    assert slots.refs[:4].tolist() == [1, 0, 0, 1] and slots.used == 2


def test_program_remove_before_zap_drops_page_from_batch():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2, 3])
    pm.remove(pg(1), pg(2), slots)
    assert states(r) == "IEIIRRRR" and r.slot.tolist()[:4] == [0, -1, 2, 3]
    assert slots.refs[:4].tolist() == [1, 1, 1, 1]  # the batch still holds slot 1
    assert b.inflight(pm).tolist() == [0, 2, 3]
    assert zap(pm, b) == [(pg(0), pg(1)), (pg(2), pg(4))]
    assert r.expect.tolist()[:4] == [1, 0, 1, 1]
    pm.remove(pg(0), pg(1), slots)
    pm.remove(pg(2), pg(4), slots)
    assert b.settle(pm, slots).tolist() == []
    assert states(r) == "SESSRRRR" and r.slot.tolist()[:4] == [0, -1, 2, 3]
    assert slots.refs[:4].tolist() == [1, 0, 1, 1] and slots.used == 3


@pytest.mark.parametrize("program_first", [True, False])
def test_program_remove_overlapping_our_zap(program_first):
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2, 3])
    (ours,) = zap(pm, b)
    if program_first:
        pm.remove(pg(2), pg(3), slots)
    pm.remove(*ours, slots)
    if not program_first:
        pm.remove(pg(2), pg(3), slots)
    assert r.expect.tolist() == [0] * 8
    b.settle(pm, slots)
    assert states(r) == "SSESRRRR"
    assert r.slot.tolist()[:4] == [0, 1, -1, 3]
    assert slots.refs[:4].tolist() == [1, 1, 0, 1] and slots.used == 3
    assert r.batch.tolist() == [0] * 8


def test_program_remove_equal_to_our_zap_either_reading_same_state():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1])
    (ours,) = zap(pm, b)
    pm.remove(*ours, slots)   # one of these is the program's, we cannot tell which
    pm.remove(*ours, slots)
    b.settle(pm, slots)
    assert states(r) == "EERRRRRR" and slots.used == 0


def test_zap_split_into_several_removes_commits_every_page():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2, 3, 4, 5])
    assert zap(pm, b) == [(pg(0), pg(6))]
    for s, e in [(0, 2), (2, 3), (3, 6)]:     # a VMA split cut the range in three
        pm.remove(pg(s), pg(e), slots)
    assert r.expect.tolist() == [0] * 8
    assert b.settle(pm, slots).tolist() == []
    assert states(r) == "SSSSSSRR" and r.slot.tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert slots.used == 6 and slots.refs[:6].tolist() == [1] * 6


@pytest.mark.parametrize("zap_sent", [True, False])
def test_settle_without_zap_gives_pages_back(zap_sent):
    slots, pm, r = setup()
    b = written(pm, slots, r, [1, 2, 4], zero=[2])
    if zap_sent:
        zap(pm, b)   # the agent failed: no REMOVE ever comes
    unprotect = b.settle(pm, slots)
    assert unprotect.tolist() == [pg(1), pg(2), pg(4)]
    assert states(r) == "RRRRRRRR"
    assert r.slot.tolist() == [-1] * 8 and r.expect.tolist() == [0] * 8
    assert r.batch.tolist() == [0] * 8
    assert slots.used == 0


def test_partial_zap_settles_each_page_by_what_happened():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 3, 4])
    assert zap(pm, b) == [(pg(0), pg(2)), (pg(3), pg(5))]
    pm.remove(pg(0), pg(2), slots)          # the zap stopped after its first range
    assert b.settle(pm, slots).tolist() == [pg(3), pg(4)]
    assert states(r) == "SSRRRRRR" and r.slot.tolist()[:5] == [0, 1, -1, -1, -1]
    assert slots.used == 2 and slots.refs[:4].tolist() == [1, 1, 0, 0]


def test_write_before_zap_cancels_page():
    slots, pm, r = setup()
    b = written(pm, slots, r, [0, 1, 2])
    cancel_page(r, 1)
    assert states(r)[:3] == "IRI" and r.slot.tolist()[:3] == [0, -1, 2]
    assert zap(pm, b) == [(pg(0), pg(1)), (pg(2), pg(3))]
    pm.remove(pg(0), pg(1), slots)
    pm.remove(pg(2), pg(3), slots)
    assert b.settle(pm, slots).tolist() == []     # the fault path already unprotected it
    assert states(r)[:3] == "SRS"
    assert slots.refs[:3].tolist() == [1, 0, 1] and slots.used == 2


def test_swap_full_pages_without_slot():
    slots, pm, r = setup(nslots=2)
    b = Batch(r, np.array([0, 1, 2]))
    live = b.inflight(pm)
    got = slots.alloc(len(live))
    assert got.tolist() == [0, 1]
    r.state[2] = RESIDENT          # what the shell does with a page it has no slot for
    b.set_slots(pm, live[:2], got)
    assert zap(pm, b) == [(pg(0), pg(2))]
    pm.remove(pg(0), pg(2), slots)
    b.settle(pm, slots)
    assert states(r)[:3] == "SSR" and r.batch.tolist() == [0] * 8 and slots.used == 2


def test_fork_during_batch():
    slots, pm, r = setup()
    done = written(pm, slots, r, [0, 1])
    for s, e in zap(pm, done):
        pm.remove(s, e, slots)
    done.settle(pm, slots)                          # pages 0, 1 swapped: slots 0, 1
    b = written(pm, slots, r, [2, 3, 4])            # slots 2, 3, 4
    zr = zap(pm, b)
    pm.remove(pg(2), pg(3), slots)                  # page 2 landed, 3 and 4 in flight
    child = pm.fork(slots)
    c = child.regions[0]
    assert states(c) == "SSSRRRRR" and c.slot.tolist()[:5] == [0, 1, 2, -1, -1]
    assert c.batch.tolist() == [0] * 8 and c.expect.tolist() == [0] * 8
    assert slots.refs[:5].tolist() == [2, 2, 2, 1, 1]
    pm.remove(pg(3), zr[0][1], slots)
    b.settle(pm, slots)
    assert states(r) == "SSSSSRRR"
    assert slots.refs[:5].tolist() == [2, 2, 2, 1, 1]
    pm.release_all(slots)
    assert slots.refs[:5].tolist() == [1, 1, 1, 0, 0]
    child.release_all(slots)
    assert slots.used == 0


def test_remap_takes_pages_out_of_their_batch():
    slots, pm, r = setup()
    done = written(pm, slots, r, [0, 1])
    for s, e in zap(pm, done):
        pm.remove(s, e, slots)
    done.settle(pm, slots)                          # slots 0, 1 region-owned
    b = written(pm, slots, r, [2, 3])               # slots 2, 3
    zap(pm, b)
    pm.remove(pg(2), pg(3), slots)                  # page 2 landed; 3 still in flight
    dst = 0x80000
    d = pm.add(dst, dst + 4 * PAGE)
    d.state[:] = SWAPPED
    d.slot[:] = slots.alloc(4)                      # slots 4..7, to be dropped
    pm.remap(A, dst, 4 * PAGE, slots)
    assert [x.start for x in pm.regions] == [pg(4), dst]
    m = pm.regions[1]
    assert states(m) == "SSSR" and m.slot.tolist() == [0, 1, 2, -1]
    assert m.batch.tolist() == [0] * 4 and m.expect.tolist() == [0] * 4
    assert slots.refs[:8].tolist() == [1, 1, 2, 1, 0, 0, 0, 0]
    assert b.inflight(pm).tolist() == []
    assert b.settle(pm, slots).tolist() == []       # page 3 is not at its old address
    assert slots.refs[:8].tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and slots.used == 3


def test_drop_of_batch_held_pages_frees_their_slots_at_settle():
    slots, pm, r = setup()
    b = written(pm, slots, r, [2, 3, 4, 5])
    zap(pm, b)
    pm.remove(pg(2), pg(4), slots)
    pm.drop(pg(3), pg(5), slots)       # page 3 landed, page 4 in flight: both unmapped
    assert slots.refs[:4].tolist() == [1, 1, 1, 1]
    pm.remove(pg(5), pg(6), slots)
    assert b.settle(pm, slots).tolist() == []
    assert [(x.start, states(x)) for x in pm.regions] == [(A, "RRS"), (pg(5), "SRR")]
    assert slots.refs[:4].tolist() == [1, 0, 0, 1] and slots.used == 2


# --- model-based: random event sequences keep the books balanced -----------------------
NSLOTS = 48
SPACE = 40          # pages of address space the regions live in


class PageMapMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.slots = Slots(NSLOTS)
        self.maps = [PageMap()]
        self.batches = []   # dicts: map, b, phase, pending REMOVEs

    # -- helpers --
    def _pm(self, i):
        return self.maps[i % len(self.maps)]

    def _batch(self, i):
        return self.batches[i % len(self.batches)]

    # -- regions --
    @rule(m=st.integers(0, 3), at=st.integers(0, SPACE - 1), n=st.integers(1, 10),
          present=st.integers(0, 1023))
    def add_region(self, m, at, n, present):
        pm = self._pm(m)
        start, end = A + at * PAGE, A + min(at + n, SPACE) * PAGE
        if pm.overlapping(start, end):
            return
        mask = np.array([(present >> k) & 1 for k in range((end - start) // PAGE)], bool)
        pm.add(start, end, mask)

    @rule(m=st.integers(0, 3), at=st.integers(0, SPACE - 1), n=st.integers(1, 8))
    def program_remove(self, m, at, n):
        self._pm(m).remove(A + at * PAGE, A + (at + n) * PAGE, self.slots)

    @rule(m=st.integers(0, 3), at=st.integers(0, SPACE - 1), n=st.integers(1, 8))
    def munmap(self, m, at, n):
        self._pm(m).drop(A + at * PAGE, A + (at + n) * PAGE, self.slots)

    @rule(m=st.integers(0, 3), frm=st.integers(0, SPACE - 1), to=st.integers(0, SPACE - 1),
          n=st.integers(1, 8))
    def remap(self, m, frm, to, n):
        if frm < to + n and to < frm + n:
            return  # the kernel refuses overlapping moves
        self._pm(m).remap(A + frm * PAGE, A + to * PAGE, n * PAGE, self.slots)

    @precondition(lambda self: len(self.maps) < 4)
    @rule(m=st.integers(0, 3))
    def fork(self, m):
        self.maps.append(self._pm(m).fork(self.slots))

    @precondition(lambda self: len(self.maps) > 1)
    @rule(m=st.integers(1, 3))
    def exit(self, m):
        i = 1 + m % (len(self.maps) - 1)
        pm = self.maps.pop(i)
        pm.release_all(self.slots)
        for bb in self.batches:   # batches of the gone process settle against nothing
            if bb["map"] is pm:
                bb["map"] = PageMap()

    # -- faults --
    @rule(m=st.integers(0, 3), at=st.integers(0, SPACE - 1))
    def fault(self, m, at):
        """What faults.py does to the page map for a read fault."""
        pm = self._pm(m)
        r, i = pm.find(A + at * PAGE)
        if r is None:
            return
        held = next((bb for bb in self.batches if bb["b"].id == r.batch[i]), None)
        if held is not None and held["b"].zap_sent:
            return  # held until the batch settles
        st_ = r.state[i]
        if st_ == SWAPPED:
            r.state[i] = LOADING
        elif st_ == LOADING:     # the read completed: COPY, then the slot goes back
            self.slots.release(r.slot[i:i + 1])
            r.slot[i] = -1
            r.state[i] = RESIDENT
        elif st_ == INFLIGHT:
            cancel_page(r, i)
        elif st_ == EMPTY:
            r.state[i] = RESIDENT

    # -- reclaim batches --
    @precondition(lambda self: len(self.batches) < 3)
    @rule(m=st.integers(0, 3), limit=st.integers(1, 12), cursor=st.integers(0, SPACE))
    def new_batch(self, m, limit, cursor):
        pm = self._pm(m)
        r, idx = policy.pick(pm, limit, A + cursor * PAGE)
        if r is None:
            return
        assert (r.state[idx] == RESIDENT).all() and (r.batch[idx] == 0).all()
        self.batches.append({"map": pm, "b": Batch(r, idx), "phase": "new", "pending": []})

    @precondition(lambda self: any(bb["phase"] == "new" for bb in self.batches))
    @rule(k=st.integers(0, 2), zero=st.integers(0, 255))
    def write_out(self, k, zero):
        bb = self._batch(k)
        if bb["phase"] != "new":
            return
        pm, b = bb["map"], bb["b"]
        live = b.inflight(pm)
        data = live[[not (zero >> (p % 8)) & 1 for p in live.tolist()]] if len(live) else live
        got = self.slots.alloc(len(data))
        for p in data[len(got):].tolist():   # swap full: those stay resident
            r, i = pm.find(int(b.addrs[p]))
            if r is not None and r.batch[i] == b.id:
                r.state[i] = RESIDENT
        b.set_slots(pm, data[:len(got)], got)
        bb["phase"] = "written"

    @precondition(lambda self: any(bb["phase"] == "written" for bb in self.batches))
    @rule(k=st.integers(0, 2), split=st.integers(0, 255), done=st.integers(0, 8))
    def send_zap(self, k, split, done):
        bb = self._batch(k)
        if bb["phase"] != "written":
            return
        pm, b = bb["map"], bb["b"]
        live = b.inflight(pm)
        b.expect_zap(pm, live)
        addrs = b.addrs[live]
        first, count = runs((addrs - A) // PAGE)
        events = []
        for j, (f, c) in enumerate(zip(first.tolist(), count.tolist())):
            s, e = A + f * PAGE, A + (f + c) * PAGE
            if c > 1 and (split >> (j % 8)) & 1:       # a VMA split: two events
                cut = s + (1 + j % (c - 1)) * PAGE
                events += [(s, cut), (cut, e)]
            else:
                events.append((s, e))
        bb["pending"] = events[:done] if done < 8 else events  # the zap may stop early
        bb["phase"] = "zapped"

    @precondition(lambda self: any(bb["pending"] for bb in self.batches))
    @rule(k=st.integers(0, 2))
    def deliver_remove(self, k):
        bb = self._batch(k)
        if bb["pending"]:
            s, e = bb["pending"].pop(0)
            bb["map"].remove(s, e, self.slots)

    @precondition(lambda self: bool(self.batches))
    @rule(k=st.integers(0, 2))
    def settle(self, k):
        bb = self._batch(k)
        if bb["pending"]:
            return  # the shell waits for every REMOVE of the zap first
        pm, b = bb["map"], bb["b"]
        before = {int(a): pm.find(int(a)) for a in b.addrs}
        was_inflight = {a for a, (r, i) in before.items()
                        if r is not None and r.batch[i] == b.id and r.state[i] == INFLIGHT}
        unprotect = b.settle(pm, self.slots)
        assert set(unprotect.tolist()) == was_inflight
        for a in unprotect.tolist():
            r, i = pm.find(a)
            assert r.state[i] == RESIDENT and r.slot[i] == -1
        self.batches.remove(bb)
        for r in pm.regions:
            assert not (r.batch == b.id).any()

    # -- the books --
    @invariant()
    def books_balance(self):
        want = np.zeros(NSLOTS, dtype=np.int64)
        active = {}
        for bb in self.batches:
            s = bb["b"].slots
            np.add.at(want, s[s >= 0], 1)
            active[bb["b"].id] = bb
        for pm in self.maps:
            assert pm._starts == [r.start for r in pm.regions]
            for r0, r1 in zip(pm.regions, pm.regions[1:]):
                assert r0.end <= r1.start
            for r in pm.regions:
                owned = (r.batch == 0) & ((r.state == SWAPPED) | (r.state == LOADING))
                np.add.at(want, r.slot[owned], 1)
                swapped = (r.state == SWAPPED) | (r.state == LOADING)
                assert (r.slot[swapped] >= 0).all(), "SWAPPED/LOADING page without a slot"
                quiet = (r.state == EMPTY) | (r.state == RESIDENT)
                assert (r.slot[quiet] == -1).all(), "EMPTY/RESIDENT page with a slot"
                assert (r.batch[r.state == INFLIGHT] != 0).all(), "INFLIGHT outside a batch"
                assert (r.expect <= 1).all()
                for bid in np.unique(r.batch[r.batch != 0]).tolist():
                    assert bid in active and active[bid]["map"] is pm, "page of a dead batch"
                for i in np.flatnonzero(r.expect).tolist():
                    bb = active.get(int(r.batch[i]))
                    assert bb is not None and bb["b"].zap_sent, "expect outside a zap"
        assert self.slots.refs.tolist() == want.tolist()
        assert self.slots.used == int(np.count_nonzero(want))

    def teardown(self):
        for bb in list(self.batches):
            bb["pending"] = []
            bb["b"].settle(bb["map"], self.slots)
        for pm in self.maps:
            pm.release_all(self.slots)
        assert self.slots.used == 0 and not self.slots.refs.any()


PageMapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestPageMapModel = PageMapMachine.TestCase


def test_ranges_step_over_swapped_pages_but_never_empty_ones():
    """An empty page may still be present (MADV_FREE keeps it, and the
    program may write it again without a fault): a zap range must not cover
    it. Swapped pages not held by a batch are certainly absent."""
    from uffdsrv.core.batch import bridgeable_gaps
    from uffdsrv.core.pages import EMPTY, RESIDENT, SWAPPED, PageMap
    pm = PageMap()
    r = pm.add(0x100000, 0x100000 + 12 * 4096)
    r.state[:] = [RESIDENT, SWAPPED, SWAPPED, RESIDENT, EMPTY, RESIDENT,
                  SWAPPED, RESIDENT, SWAPPED, SWAPPED, SWAPPED, RESIDENT]
    r.batch[6] = 7  # held by another batch
    idx = np.array([0, 3, 5, 7, 11])
    assert bridgeable_gaps(r, idx, 64).tolist() == [1, 2, 8, 9, 10]
    assert bridgeable_gaps(r, idx, 2).tolist() == [1, 2]
    # an empty page the pagemap shows absent may be stepped over, not a present one
    absent = np.zeros(12, dtype=bool)
    absent[4] = True
    assert bridgeable_gaps(r, idx, 64, absent).tolist() == [1, 2, 4, 8, 9, 10]
    assert bridgeable_gaps(r, idx, 64, np.zeros(12, dtype=bool)).tolist() == [1, 2, 8, 9, 10]
