"""The journal: what a restarted server needs to find every reclaimed page.

While a page is reclaimed the only copy of its bytes is in the swap file;
the page map saying which slot holds it must outlive the server. Records
are appended with write(2) (the kernel's page cache outlives a killed
server; a machine crash takes the managed programs with it, so nothing
needs fsync):

  CLIENT  cid pid starttime flags   a process with an agent (starttime
                                    tells a reused pid apart)
  AGENT   cid private_end beacon    its agent's mapping (start in `a`)
  FORK    child parent              the child's map is the parent's, now
  BIND    cid pid starttime         a forked child's pid, once known
  EXIT    cid                       the process is gone: free its slots
  REGION  cid start end             a managed range
  SWAP    cid addr npages slot0     these pages' bytes are in these slots;
                                    written *before* the zap is sent
  ZAP     cid addr npages           a zap of these pages (which hold no
                                    slot: all zeros, or absent ones the
                                    ranges step over) was sent; written
                                    before it, like SWAP
  SETTLED cid addr npages           the zap of these pages is over
  FREE    cid addr npages           these pages no longer hold a slot
  UNMAP   cid start end
  REMAP   cid from to len

Replay runs the records through the same PageMap functions the server
uses, so the two cannot disagree about what an event means. The result is
refined with the truth at takeover: a page recorded SWAP that is present
in the process either still waits for a zap the dead server sent (no
SETTLED yet: replay leaves `expect` set on it), or was faulted back in and
the dead server did not get to write its FREE (settled: it is resident).
A page of an unsettled ZAP is held the same way, slot or not: the program
may write it before the late zap runs, and that zap's REMOVE must then
read as ours (the write waits for it), not as the program's own DONTNEED.
"""
import struct
from dataclasses import dataclass, field

import numpy as np

from .pages import EMPTY, INFLIGHT, PAGE, RESIDENT, SWAPPED, PageMap, Region
from .ranges import paired_runs, runs
from .slots import Slots

REC = struct.Struct("<BxxxIQQQ")  # 32 bytes
CLIENT, AGENT, FORK, BIND, EXIT, REGION, SWAP, FREE, UNMAP, REMAP, SETTLED, ZAP = range(1, 13)


@dataclass
class Recovered:
    cid: int
    pid: int = 0
    starttime: int = 0
    flags: int = 0
    private: tuple[int, int] = (0, 0)
    beacon: int = 0
    pages: PageMap = field(default_factory=PageMap)


def pack(op: int, cid: int, a: int = 0, b: int = 0, c: int = 0) -> bytes:
    return REC.pack(op, cid, a, b, c)


def replay(data: bytes, nslots: int) -> tuple[dict[int, Recovered], Slots]:
    """Rebuild the page maps of the clients still alive at the end of the
    journal, and the slot references they hold."""
    slots = Slots(nslots)
    clients: dict[int, Recovered] = {}
    n = len(data) // REC.size  # a torn last record is ignored
    for op, cid, a, b, c in REC.iter_unpack(data[:n * REC.size]):
        if op == CLIENT:
            old = clients.pop(cid, None)
            if old is not None:
                old.pages.release_all(slots)
            clients[cid] = Recovered(cid, a, b, c)
            continue
        if op == FORK:
            parent = clients.get(b)
            child = clients[a] = Recovered(a)
            if parent is not None:
                child.pages = parent.pages.fork(slots)
                child.flags, child.private, child.beacon = (parent.flags, parent.private,
                                                            parent.beacon)
            continue
        r = clients.get(cid)
        if r is None:
            continue
        if op == AGENT:
            r.private, r.beacon = (a, b), c
        elif op == BIND:
            r.pid, r.starttime = a, b
        elif op == EXIT:
            r.pages.release_all(slots)
            del clients[cid]
        elif op == REGION:
            for s, e in r.pages.gaps(a, b):
                r.pages.add(s, e)
        elif op == SWAP:
            _swap(r.pages, slots, a, b, c)
        elif op == FREE:
            _free(r.pages, slots, a, a + b * PAGE)
        elif op == SETTLED:
            for reg, lo, hi in r.pages.overlapping(a, a + b * PAGE):
                reg.expect[lo:hi] = 0
        elif op == ZAP:
            for reg, lo, hi in r.pages.overlapping(a, a + b * PAGE):
                reg.expect[lo:hi] = 1
        elif op == UNMAP:
            r.pages.drop(a, b, slots)
        elif op == REMAP:
            r.pages.remap(a, b, c, slots)
    return clients, slots


def _swap(pages: PageMap, slots: Slots, addr: int, npages: int, slot0: int) -> None:
    _free(pages, slots, addr, addr + npages * PAGE)
    for r, lo, hi in pages.overlapping(addr, addr + npages * PAGE):
        first = slot0 + (r.start + lo * PAGE - addr) // PAGE
        got = np.arange(first, first + hi - lo, dtype=np.int64)
        got = got[got < slots.nslots]
        k = len(got)
        r.state[lo:lo + k] = SWAPPED
        r.slot[lo:lo + k] = got
        r.expect[lo:lo + k] = 1  # its zap is pending until SETTLED
        fresh = slots.refs[got] == 0
        slots.refs[got] += 1
        slots.used += int(np.count_nonzero(fresh))


def _free(pages: PageMap, slots: Slots, start: int, end: int) -> None:
    for r, lo, hi in pages.overlapping(start, end):
        st = r.state[lo:hi]
        held = st == SWAPPED
        slots.release(r.slot[lo:hi][held])
        st[held] = EMPTY
        r.slot[lo:hi][held] = -1
        r.expect[lo:hi] = 0


def snapshot(clients) -> bytes:
    """Records that rebuild the given live state (server Clients or
    Recovered), for compaction."""
    out = []
    for c in clients:
        out.append(pack(CLIENT, c.cid, c.pid or 0, c.starttime, c.flags))
        out.append(pack(AGENT, c.cid, c.private[0], c.private[1], c.beacon))
        for r in c.pages.regions:
            out.append(pack(REGION, c.cid, r.start, r.end))
            # pages a batch holds with a slot (a zap may be on its way) are
            # written as pending; the others as settled
            held = (r.batch != 0) & (r.slot >= 0) & ((r.state == INFLIGHT) | (r.state == SWAPPED))
            idx = np.flatnonzero((r.state >= SWAPPED) | held)
            out.extend(swap_records(c.cid, r.start + idx * PAGE, r.slot[idx]))
            done = idx[~held[idx]]
            out.extend(settled_records(c.cid, r.start + done * PAGE))
            # the slotless pages a sent zap still covers (a stop leaves them so)
            zapping = np.flatnonzero((r.batch != 0) & (r.slot < 0) & (r.expect > 0))
            out.extend(zap_records(c.cid, r.start + zapping * PAGE))
    return b"".join(out)


def swap_records(cid: int, addrs, slots) -> list[bytes]:
    """SWAP records for pages at `addrs` held in `slots`, one per run that
    is adjacent in both address and slot."""
    addrs = np.asarray(addrs, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    first, count = paired_runs(addrs // PAGE, slots)
    return [pack(SWAP, cid, int(addrs[f]), int(n), int(slots[f]))
            for f, n in zip(first.tolist(), count.tolist())]


def _run_records(op: int, cid: int, addrs) -> list[bytes]:
    addrs = np.asarray(addrs, dtype=np.int64)
    if not len(addrs):
        return []
    base = int(addrs[0])
    first, count = runs((addrs - base) // PAGE)
    return [pack(op, cid, base + int(f) * PAGE, int(n))
            for f, n in zip(first.tolist(), count.tolist())]


def settled_records(cid: int, addrs) -> list[bytes]:
    """SETTLED records for the sorted pages at `addrs`, one per run."""
    return _run_records(SETTLED, cid, addrs)


def zap_records(cid: int, addrs) -> list[bytes]:
    """ZAP records for the sorted slotless pages at `addrs`, one per run."""
    return _run_records(ZAP, cid, addrs)


def free_records(cid: int, addrs) -> list[bytes]:
    """FREE records for the sorted pages at `addrs`, one per run."""
    return _run_records(FREE, cid, addrs)


@dataclass
class Refined:
    """What a region's journaled state becomes once the process is seen."""
    freed: np.ndarray    # pages whose FREE the dead server did not write
    pending: np.ndarray  # swapped, present, zap unsettled: not zapped yet
    gaps: np.ndarray     # swapped, absent, zap unsettled: zapped, or stepped over


def refine(region: Region, present: np.ndarray, slots: Slots) -> Refined:
    """Correct a replayed region with the truth of the live process
    (pagemap): a page never seen but present is resident; a page recorded
    swapped whose zap had settled but that is present was faulted back in
    (its slot goes back); a page whose zap had not settled (SWAP or ZAP)
    either still waits for that zap (present) or was zapped (absent). The
    last two are returned for the caller to hold as a batch until the agent
    is back; `expect` is cleared here (the batch counts the REMOVEs anew)."""
    st = region.state
    st[present & (st == EMPTY)] = RESIDENT
    back = np.flatnonzero(present & (st == SWAPPED) & (region.expect == 0))
    if len(back):
        slots.release(region.slot[back])
        st[back], region.slot[back] = RESIDENT, -1
    unsettled = region.expect > 0
    out = Refined(back, np.flatnonzero(present & unsettled), np.flatnonzero(~present & unsettled))
    region.expect[:] = 0
    return out
