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
