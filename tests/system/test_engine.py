"""The native fault engine against the real kernel, with no server: an
anonymous mapping of this process registered on a uffd, a swap file opened
O_DIRECT in a temp dir holding known pages, the region's arrays set to
SWAPPED with their slots, and a thread that faults the pages while this
thread serves them through the engine and the ring.

One sequence of faults and events is run through the engine and through
the plain rules of core/swapin.py (Model), and the resulting arrays, slot
counts and FREE records must be the same."""
import mmap
import os
import select
import threading
import time

import numpy as np
import pytest

from uffdsrv.core import journal
from uffdsrv.core.pages import EMPTY, LOADING, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.slots import Slots
from uffdsrv.core.swapin import MAX_READAHEAD, Model
from uffdsrv.system import proc, uffd

from .helpers import PAGE, WAIT, Worker, addr_of, anon, libc, pattern, read_page, root_missing

pytestmark = pytest.mark.skipif(root_missing() is not None, reason=str(root_missing()))

try:
    from uffdsrv.system.engine import HAND, RETRY, C, Engine
    from uffdsrv.system.ring import Ring
except ImportError as e:  # pragma: no cover - the native build is older
    pytest.skip(f"no native engine: {e}", allow_module_level=True)

NSLOTS = 512
MADV_DONTNEED = 4


def page_bytes(slot: int) -> bytes:
    return pattern(PAGE, slot * 13 + 1)


def tier_bytes(slot: int) -> bytes:
    """What the tier holds for a slot in the tests that prove a page came
    from the tier: compressible, and unlike the device's copy."""
    return ((b"tier page of slot %06d; " % slot) * PAGE)[:PAGE]


class Rig:
    """One client: the mapping, its uffd, a page map, the swap file, a
    ring and an engine."""

    def __init__(self, tmp, npages: int, register: bool = False):
        self.npages = npages
        self.fd = uffd.open_uffd()
        self.map = self.ring = self.engine = None
        self.swap_fd = None
        try:
            uffd.api(self.fd, uffd.FEATURE_THREAD_ID)
            self.map = anon(npages)
            self.addr = addr_of(self.map)
            uffd.register(self.fd, self.addr, npages * PAGE, uffd.REGISTER_MODE_MISSING)
            self.swap_fd = os.open(tmp / "swap", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
            aligned = mmap.mmap(-1, NSLOTS * PAGE)
            for s in range(NSLOTS):
                aligned[s * PAGE:(s + 1) * PAGE] = page_bytes(s)
            assert os.pwritev(self.swap_fd, [aligned], 0) == NSLOTS * PAGE
            aligned.close()
            self.ring = Ring(256, 8 * MAX_READAHEAD * PAGE, register=register)
            self.engine = Engine(self.ring, self.ring.arena_addr, 8 * MAX_READAHEAD * PAGE)
            self.slots = Slots(NSLOTS)
            self.engine.set_swap(self.swap_fd, self.slots)
            self.pages = PageMap()
            self.region = self.pages.add(self.addr, self.addr + npages * PAGE)
            self.h = self.engine.client(self.fd)
            self.h.publish(self.pages, 7, 0)
        except BaseException:
            self.close()
            raise
        self.tier = None
        self.records: list[tuple[int, int]] = []
        self.served: list[tuple[int, int, int]] = []  # (addr, flags, tid) as read

    def swap_out(self, idx, slots) -> None:
        r = self.region
        for i, s in zip(idx, slots):
            r.state[i], r.slot[i] = SWAPPED, s
            self.slots.refs[s] = 1
        self.slots.used += len(idx)

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def with_tier(self, stored: dict[int, bytes]):
        """A RamTier holding these pages under these slots, in the engine."""
        from uffdsrv.system.tier import RamTier
        self.tier = RamTier(4 << 20, NSLOTS)
        buf = anon(max(1, len(stored)))
        for k, data in enumerate(stored.values()):
            buf[k * PAGE:(k + 1) * PAGE] = data
        assert self.tier.store(addr_of(buf), range(len(stored)), list(stored)) == len(stored)
        buf.close()
        self.engine.set_tier(self.tier)
        return self.tier

    def take(self) -> list:
        outs, recs = self.engine.take()
        for k in range(0, len(recs), journal.REC.size):
            op, cid, a, b, _ = journal.REC.unpack_from(recs, k)
            assert (op, cid) == (journal.FREE, 7)
            self.records.append((a, b))
        return [] if outs is None else outs.tolist()

    def serve_until(self, done, on_read=None, timeout: float = WAIT) -> None:
        """Serve faults and completions until done() (or fail)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "faults not served in time"
            r, _, _ = select.select([self.fd, self.ring.eventfd], [], [], 0.05)
            if self.ring.eventfd in r or self.engine.busy:
                self.ring.harvest()
                self._outs(self.take())
            if self.fd in r:
                try:
                    buf = bytearray(os.read(self.fd, 64 * uffd.MSG_SIZE))
                except BlockingIOError:
                    continue
                msgs = uffd.parse(bytes(buf), len(buf))
                self.served += [(int(m["a1"]) & ~(PAGE - 1), int(m["a0"]),
                                 int(m["a2"]) & 0xFFFFFFFF) for m in msgs]
                self.h.serve(buf, len(buf), time.monotonic_ns())
                self._outs(self.take())
                if on_read is not None:
                    on_read(msgs)

    def _outs(self, outs) -> None:
        for addr, _flags, _tid, _, kind, _ in outs:
            assert kind in (RETRY, HAND), outs
            if kind == RETRY:  # EAGAIN cannot happen here: no events are enabled
                raise AssertionError(f"retry of {addr:#x}")
            raise AssertionError(f"handed back {addr:#x}")

    def settle(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.engine.busy:
            assert time.monotonic() < deadline, "reads never completed"
            select.select([self.ring.eventfd], [], [], 0.05)
            self.ring.harvest()
        self._outs(self.take())

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if getattr(self, "tier", None) is not None:
            self.tier.close()
        if self.ring is not None:
            self.ring.close()
        for fd in (self.fd, self.swap_fd):
            if fd is not None:
                os.close(fd)
        if self.map is not None:
            self.map.close()


@pytest.fixture(params=[False, True], ids=["plain-reads", "registered-arena"])
def rig(tmp_path, request):
    """Each test twice: the engine's swap reads as plain READs into an
    unregistered arena (the server's default) and as READ_FIXED."""
    made = []

    def make(npages):
        r = Rig(tmp_path, npages, register=request.param)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def walk(rig: Rig, order) -> tuple[list[bytes], int]:
    """Read pages in `order` from one thread, serving them here."""
    out = {}

    def reader():
        out["tid"] = threading.get_native_id()
        out["data"] = [read_page(rig.page(i)) for i in order]
    w = Worker(reader)
    w.start()
    rig.serve_until(w.done.is_set)
    w.finish()
    rig.settle()
    return out["data"], out["tid"]


def test_swap_in_bytes_states_slots_and_records(rig):
    r = rig(16)
    slots = [100, 101, 102, 7, 300, 301]
    r.swap_out(range(6), slots)
    data, _ = walk(r, [3, 0, 10])
    assert data[0] == page_bytes(7)
    assert data[1] == page_bytes(100)
    assert data[2] == bytes(PAGE)  # never reclaimed: a zero page
    st = r.region.state
    assert st[3] == RESIDENT and st[0] == RESIDENT and st[10] == RESIDENT
    assert r.region.slot[0] == -1 and r.region.slot[3] == -1
    # page 0 came alone (a new stream: window 1); the rest stay swapped
    assert list(st[1:3]) == [SWAPPED, SWAPPED]
    assert [int(r.slots.refs[s]) for s in slots] == [0, 1, 1, 0, 1, 1]
    assert r.slots.used == 4 and r.slots.counters[1] <= 7
    assert sorted(r.records) == [(r.page(0), 1), (r.page(3), 1)]
    assert r.engine.stats()["bad_release"] == 0
    assert int(r.h.counters[C["refaults"]]) == 2
    assert int(r.h.counters[C["zero"]]) == 1


def test_readahead_by_address_with_scattered_slots(rig):
    """A region reclaimed twice: its slots are all over the file, yet a
    sequential walk brings the neighbours along, with the right bytes."""
    r = rig(64)
    slots = np.random.default_rng(3).permutation(NSLOTS)[:64].tolist()
    r.swap_out(range(64), slots)
    data, _ = walk(r, range(64))
    assert data == [page_bytes(s) for s in slots]
    loads = int(r.h.counters[C["swap"]])
    assert loads <= 8, f"{loads} swap reads for 64 sequential pages"
    assert int(r.h.counters[C["readahead"]]) == 64 - loads
    assert (r.region.state == RESIDENT).all()
    assert not r.slots.refs.any() and r.slots.used == 0
    got = sorted(r.records)
    assert sum(n for _, n in got) == 64


@pytest.mark.parametrize("tiered", [False, True], ids=["device", "tier"])
def test_engine_and_core_rules_agree(rig, tiered):
    """One thread walks two arrays in step, jumps at random, meets a hole,
    batch-held and never-reclaimed neighbours; a REMOVE lands while a
    readahead is in flight. Engine and Model must end in the same place.
    With a tier holding every third page (the same bytes as the device:
    a hit is only a faster read), the outcome must be the same."""
    n = 128
    r = rig(n)
    rng = np.random.default_rng(11)
    swapped = [i for i in range(n) if i not in (5, 70, 71) and not 100 <= i < 110]
    slots = rng.permutation(NSLOTS)[:len(swapped)].tolist()
    r.swap_out(swapped, slots)
    if tiered:
        r.with_tier({s: page_bytes(s) for s in slots[::3]})
    r.region.batch[40] = 9          # held by a batch: never read ahead
    r.region.state[5] = RESIDENT    # a hole the windows step over (absent: zero-filled)
    r.region.heat[0] = 3
    model_pages = PageMap()
    mr = model_pages.add(r.addr, r.addr + n * PAGE)
    mslots = Slots(NSLOTS)
    for a, b in ((mr.state, r.region.state), (mr.slot, r.region.slot),
                 (mr.batch, r.region.batch), (mr.heat, r.region.heat)):
        a[:] = b
    mslots.refs[:] = r.slots.refs
    mslots.counters[:] = r.slots.counters
    model = Model(model_pages, mslots)

    order = []
    for k in range(20):             # two streams in step
        order += [k, 64 + k]
    order += [50, 120, 58, 125, 53, 116, 61, 127, 100, 101, 4, 6, 33]  # random: new streams
    data, tid = walk(r, order)
    for a, _fl, t in r.served:
        model.fault(a, t, False)
        model.complete()
    assert all(t == tid for _, _, t in r.served)
    # both streams got readahead: far fewer reads than pages
    assert int(r.h.counters[C["swap"]]) < 20

    # a REMOVE of a page whose readahead is in flight
    base = 111
    seen = [len(r.served)]
    late = {}

    def on_read(msgs):
        new = r.served[seen[0]:]
        seen[0] = len(r.served)
        for a, _fl, t in new:
            model.fault(a, t, False)
        if r.page(base + 1) not in [a for a, _, _ in new]:
            model.complete()
            return
        # the program's MADV_DONTNEED of page base+2, read while the load
        # of base+1 .. base+2 is out: applied to both maps at once
        late["in_flight"] = r.engine.busy > 0
        if not late["in_flight"]:
            model.complete()
        for pm, sl in ((r.pages, r.slots), (model_pages, mslots)):
            pm.remove(r.page(base + 2), r.page(base + 3), sl)
        assert libc.madvise(r.page(base + 2), PAGE, MADV_DONTNEED) == 0
    out = {}

    def reader():
        out["d"] = [read_page(r.page(base)), read_page(r.page(base + 1))]
    w = Worker(reader)
    w.start()
    r.serve_until(w.done.is_set, on_read)
    w.finish()
    r.settle()
    for a, _fl, t in r.served[seen[0]:]:
        model.fault(a, t, False)
    model.complete()
    assert "in_flight" in late
    assert r.region.state[base + 2] == EMPTY and r.region.slot[base + 2] == -1

    assert (r.region.state == mr.state).all(), np.flatnonzero(r.region.state != mr.state)
    assert (r.region.slot == mr.slot).all()
    assert (r.region.heat == mr.heat).all(), np.flatnonzero(r.region.heat != mr.heat)
    assert (r.slots.refs == mslots.refs).all()
    assert (r.slots.counters == mslots.counters).all()
    assert sorted(r.records) == sorted(model.frees)
    assert int(r.h.counters[C["readahead_misses"]]) == model.streams.misses
    assert model.streams.misses > 0  # the two walks were left with pages never walked
    assert not (r.region.state == LOADING).any()
    assert r.engine.stats()["bad_release"] == 0
    # and every byte is right
    for i, d in zip(order, data):
        if i in (5, 70, 71) or 100 <= i < 110:
            assert d == bytes(PAGE), i
        else:
            assert d == page_bytes(slots[swapped.index(i)]), i
    assert out["d"][1] == page_bytes(slots[swapped.index(base + 1)])
    if tiered:
        got = r.tier.stats()
        tier_pages = int(r.h.counters[C["tier_pages"]])
        # a page can be loaded and not put in (the REMOVE above): lookups >= pages in
        pages_in = int(r.h.counters[C["swapped_in"]])
        assert got["hits"] >= tier_pages > 0 and got["hits"] + got["misses"] >= pages_in
        assert got["hits"] + got["misses"] <= pages_in + 1
        # the reads carried only what the tier lacked
        assert int(r.h.counters[C["read_bytes"]]) == got["misses"] * PAGE
        # every slot the engine freed left the tier; what is left is still swapped
        left = set(slots[::3]) & set(int(s) for s in r.region.slot[r.region.slot >= 0])
        assert got["stored_pages"] == len(left)


def test_batch_held_and_beacon_are_handed_back(rig):
    r = rig(8)
    r.swap_out([2], [50])
    r.region.batch[2] = 3
    w = Worker(read_page, r.page(2))
    w.start()
    got = []
    deadline = time.monotonic() + WAIT
    while not got:
        assert time.monotonic() < deadline
        select.select([r.fd], [], [], 0.05)
        try:
            buf = bytearray(os.read(r.fd, 64 * uffd.MSG_SIZE))
        except BlockingIOError:
            continue
        r.h.serve(buf, len(buf), time.monotonic_ns())
        got = r.take()
    assert [(o[0], o[4]) for o in got] == [(r.page(2), HAND)]
    assert r.region.state[2] == SWAPPED and r.slots.refs[50] == 1
    # Python lets the batch settle, then serves it: the engine reads it now
    r.region.batch[2] = 0
    msg = np.zeros(1, dtype=uffd.MSG_DTYPE)
    msg["event"], msg["a1"] = uffd.EVENT_PAGEFAULT, r.page(2)
    r.h.serve(msg.tobytes(), msg.nbytes, 0, True)
    r.settle()
    assert w.finish() == page_bytes(50)
    assert r.region.state[2] == RESIDENT


def test_restore_puts_everything_back(rig):
    r = rig(80)
    slots = list(range(200, 280))
    r.swap_out(range(80), slots)
    r.region.batch[10] = 4  # a batch's: left alone
    total = 0
    for _ in range(100):
        total += r.h.restore(r.addr, r.addr + 80 * PAGE, 2)
        r.settle()
        if not (r.region.state == SWAPPED).sum() - 1:
            break
    assert total == 79
    assert int(r.h.counters[C["restored"]]) == 79
    assert r.region.state[10] == SWAPPED and r.slots.refs[210] == 1
    assert r.slots.used == 1
    # heat is untouched: a restore is not a fault
    assert not r.region.heat.any()
    # this thread is the fault server: read only what is present
    present = proc.pagemap_present(os.getpid(), r.addr, 80)
    assert present.sum() == 79 and not present[10]
    assert [bytes(r.map[i * PAGE:(i + 1) * PAGE]) for i in (0, 11, 79)] \
        == [page_bytes(200), page_bytes(211), page_bytes(279)]


def test_tier_hits_read_nothing_and_misses_read_the_device(rig):
    """The device's copy of the tier's slots is deliberately different: a
    page that comes back with the tier's bytes was not read."""
    r = rig(32)
    slots = list(range(100, 116))
    r.swap_out(range(16), slots)
    in_tier = {s: tier_bytes(s) for s in slots[::2]}
    in_tier[slots[4]] = b"\xab" * PAGE  # same-filled, not zeros
    tier = r.with_tier(in_tier)
    order = [0, 9, 2, 13, 4, 7, 10, 1, 15, 6]  # no two in step: one page a read
    data, _ = walk(r, order)
    for i, d in zip(order, data):
        want = in_tier.get(slots[i], page_bytes(slots[i]))
        assert d == want, i
    hits = sum(slots[i] in in_tier for i in order)
    from_tier = int(r.h.counters[C["tier_pages"]])  # readahead included
    pages_in = int(r.h.counters[C["swapped_in"]])
    assert int(r.h.counters[C["tier_faults"]]) == hits and from_tier >= hits
    assert int(r.h.counters[C["read_bytes"]]) == (pages_in - from_tier) * PAGE
    assert int(r.h.counters[C["refaults"]]) == len(order)
    kinds = {k for k, _, _ in r.engine.samples()}
    assert kinds == {"tier", "swap"}
    st = tier.stats()
    assert st["hits"] == from_tier and st["misses"] == pages_in - from_tier
    assert st["hit_ns"] > 0
    # the slots the engine freed are out of the tier; the rest stay
    freed = {s for s in slots if r.slots.refs[s] == 0}
    assert len(freed) == pages_in
    assert st["stored_pages"] == len(set(in_tier) - freed)
    assert st["dropped_pages"] == len(set(in_tier) & freed)


def test_a_reused_slot_never_serves_the_tiers_old_bytes(rig):
    """Slot 50 comes back from the tier and is freed; it is then reused for
    another page that reclaim wrote to the device but never stored in the
    tier. That page must come from the device."""
    r = rig(8)
    r.swap_out([0], [50])
    tier = r.with_tier({50: tier_bytes(50)})
    data, _ = walk(r, [0])
    assert data == [tier_bytes(50)]
    assert tier.load(50) is None  # freed by the engine: dropped
    r.swap_out([3], [50])
    data, _ = walk(r, [3])
    assert data == [page_bytes(50)]
    assert int(r.h.counters[C["tier_faults"]]) == 1


def test_readahead_and_restore_mix_tier_and_device(rig):
    """A sequential walk whose pages are scattered over the file, half of
    them in the tier: runs of hits and misses in one load, each page from
    its own source; then a restore of the rest, the same way."""
    r = rig(96)
    rng = np.random.default_rng(4)
    slots = rng.permutation(NSLOTS)[:96].tolist()
    r.swap_out(range(96), slots)
    in_tier = {s: tier_bytes(s) for s in slots if rng.random() < 0.5}
    tier = r.with_tier(in_tier)
    data, _ = walk(r, range(48))
    for i, d in zip(range(48), data):
        assert d == in_tier.get(slots[i], page_bytes(slots[i])), i
    assert int(r.h.counters[C["swap"]]) <= 8  # readahead still works
    total = 0
    for _ in range(100):
        total += r.h.restore(r.addr, r.addr + 96 * PAGE)
        r.settle()
        if not (r.region.state == SWAPPED).any():
            break
    assert (r.region.state == RESIDENT).all()
    for i in range(96):
        assert bytes(r.map[i * PAGE:(i + 1) * PAGE]) == in_tier.get(slots[i], page_bytes(slots[i]))
    pages_from_tier = int(r.h.counters[C["tier_pages"]])
    assert pages_from_tier == len(in_tier)
    assert int(r.h.counters[C["read_bytes"]]) == (96 - len(in_tier)) * PAGE
    assert tier.stats()["stored_pages"] == 0 and r.slots.used == 0
