"""The bookkeeping under a zap that may come late or be refused (issue 11,
items 1-2 and locked memory): a batch settles once, whichever path ends
it; a refused zap gives every slot back; mlocked mappings are found in
smaps text and cut out of what is managed."""
import numpy as np

from uffdsrv.core.batch import Batch
from uffdsrv.core.maps import locked, overlap
from uffdsrv.core.pages import PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.slots import Slots

from ..support import A, region, states


def zapped_batch(npages=6):
    slots, pm = Slots(32), PageMap()
    r = region(pm, "R" * npages)
    b = Batch(r, np.arange(npages, dtype=np.int64))
    b.set_slots(pm, np.arange(npages), slots.alloc(npages))
    b.expect_zap(pm, np.arange(npages))
    return slots, pm, r, b


def test_a_batch_settles_once_whoever_ends_it():
    """A late answer's settle and a HELLO's (or a client release's) may both
    reach one batch: the second must neither raise nor hand the same slots
    back again."""
    slots, pm, r, b = zapped_batch()
    pm.remove(A, A + 3 * PAGE, slots)  # the zap's REMOVE for the first half
    b.settle(pm, slots)
    assert states(r) == "SSSRRR" and slots.used == 3
    assert b.settle(pm, slots).tolist() == []
    assert slots.used == 3 and r.slot.tolist()[:3] == [0, 1, 2]
    pm.release_all(slots)
    assert slots.used == 0 and not slots.refs.any()


def test_a_refused_zap_gives_the_batch_back_with_no_slot_left():
    """EINVAL on a locked range: no REMOVE came, so every page is still in
    flight; settling makes them resident and frees every slot."""
    slots, pm, r, b = zapped_batch()
    unprotect = b.settle(pm, slots)
    assert states(r) == "RRRRRR" and slots.used == 0
    assert (r.slot == -1).all() and (r.expect == 0).all() and (r.batch == 0).all()
    assert len(unprotect) == 6
    assert pm.count(RESIDENT) == 6 and pm.count(SWAPPED) == 0


SMAPS = """\
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                8192 kB
Locked:                0 kB
VmFlags: rd wr mr mw me ac sd
7f0000800000-7f0001000000 rw-p 00000000 00:00 0
Size:               8192 kB
Locked:             8192 kB
VmFlags: rd wr mr mw me lo ac sd
7f0001000000-7f0001400000 rw-p 00000000 00:00 0
Locked:             4096 kB
VmFlags: rd wr mr mw me lo ac sd
7f0002000000-7f0002200000 r-xp 00000000 08:01 1234                       /usr/lib/x.so
VmFlags: rd ex mr mw me lo
7ffd5a100000-7ffd5a300000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
"""


def test_locked_mappings_are_read_from_vmflags():
    # adjacent locked mappings merge; "lock" in a name or a flag like
    # "loc" would not count, only the flag "lo"
    assert locked(SMAPS) == [(0x7F0000800000, 0x7F0001400000),
                             (0x7F0002000000, 0x7F0002200000)]
    assert locked(SMAPS.replace(" lo ", " ").replace(" lo\n", "\n")) == []
    assert locked("") == []


def test_the_locked_part_of_managed_ranges():
    managed = [(0x1000, 0x9000), (0x10000, 0x20000)]
    assert overlap(managed, [(0x0, 0x2000), (0x8000, 0x12000), (0x30000, 0x40000)]) == [
        (0x1000, 0x2000), (0x8000, 0x9000), (0x10000, 0x12000)]
    assert overlap(managed, []) == []
    assert overlap([], [(0, 1 << 40)]) == []
    assert overlap(managed, [(0x9000, 0x10000)]) == []


def test_a_late_zap_over_zero_pages_reads_as_ours_after_a_takeover():
    """A stop left a batch whose zap went out: pages 0-1 with slots (SWAP),
    page 2 all zeros and page 3 an absent page the range stepped over (no
    slot: ZAP). The next server holds all four until the agent is back, so
    the late zap's REMOVE lands on them as ours: the swapped pages stay
    swapped with their slots, and a write to the zero page that came before
    it waits for the batch instead of being dropped by it."""
    from uffdsrv.core import journal as j
    from uffdsrv.core.batch import Batch as B

    log = b"".join([j.pack(j.CLIENT, 1, 100, 7001, 4), j.pack(j.AGENT, 1, 0, 0, 0),
                    j.pack(j.REGION, 1, A, A + 6 * PAGE),
                    *j.swap_records(1, [A, A + PAGE], [5, 6]),
                    *j.zap_records(1, [A + 2 * PAGE, A + 3 * PAGE])])
    clients, slots = j.replay(log, 32)
    [r] = clients[1].pages.regions
    assert r.expect.tolist() == [1, 1, 1, 1, 0, 0]
    present = np.array([True, True, True, False, True, False])  # the zap has not run
    got = j.refine(r, present, slots)
    assert got.pending.tolist() == [0, 1, 2] and got.gaps.tolist() == [3]
    pm = clients[1].pages
    b = B.recovered(pm, r, got.pending, got.gaps)
    assert (r.batch[:4] == b.id).all() and r.batch[4] == 0 and b.zap_sent
    pm.remove(A, A + 4 * PAGE, slots)  # the late zap
    b.settle(pm, slots)
    assert states(r) == "SSEERE"
    assert r.slot.tolist()[:2] == [5, 6] and slots.used == 2


def test_a_snapshot_keeps_the_zap_of_slotless_pages():
    from uffdsrv.core import journal as j

    slots, pm, r, b = zapped_batch(4)
    b.set_slots(pm, np.array([2, 3]), np.array([-1, -1]))  # all zeros
    slots.release(np.array([2, 3]))

    class C:
        cid, pid, starttime, flags, private, beacon = 1, 100, 7001, 0, (0, 0), 0
        pages = pm
    clients, _ = j.replay(j.snapshot([C]), 32)
    assert clients[1].pages.regions[0].expect.tolist() == [1, 1, 1, 1]
