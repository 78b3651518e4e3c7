"""The rules of a fault: how it is served, which pages a swap-in brings
along, and what a finished load does to the page map.

The native fault engine (native/src/engine.c) applies exactly these rules
in C, one call per read of uffd messages; this module is their plain
statement, which the unit tests check without C and which a system test
runs side by side with the engine on one sequence of faults and events.

How a fault is served (`classify`), from the page's state, whether a
reclaim batch holds it, and whether it is a write-protect fault:

  batch != 0                      -> HAND   (held faults, cancel_page: Python)
  WP, EMPTY/RESIDENT              -> UNPROTECT (warm it, let the write through)
  WP, anything else               -> HAND
  EMPTY/RESIDENT                  -> ZERO   (a page never reclaimed)
  SWAPPED                         -> SWAP   (read back, with readahead)
  LOADING                         -> WAIT   (the COPY on its way wakes it)
  INFLIGHT                        -> HAND

Readahead goes by virtual address, as the kernel's VMA readahead does: a
fault at page i brings pages i .. i+w-1 of its region that are SWAPPED and
not held by a batch, wherever their slots are (holes are stepped over).
The window w comes from a small table of streams per client (tid, next
address, window): a fault at a stream's next address doubles its window up
to MAX_READAHEAD (a fault up to a window past it still counts: the
thread stepped over pages that were never reclaimed, or resident ones);
any other fault starts a stream of window 1, so random
access pays no readahead, and a thread walking two arrays in step keeps a
stream on each. Streams are replaced least recently used; a stream
replaced before the fault that would confirm its last readahead never had
those pages walked: they count as misses.
"""
import numpy as np

from .pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap
from .slots import Slots

MAX_READAHEAD = 32
STREAMS = 8
ZERO, UNPROTECT, SWAP, WAIT, HAND = range(5)
KIND_NAMES = ("zero", "write_protect", "swap", "loading", "hand")


def classify(state: int, batch: int, wp: bool) -> int:
    if batch:
        return HAND
    if wp:
        return UNPROTECT if state in (EMPTY, RESIDENT) else HAND
    if state in (EMPTY, RESIDENT):
        return ZERO
    if state == SWAPPED:
        return SWAP
    if state == LOADING:
        return WAIT
    assert state == INFLIGHT or state > LOADING
    return HAND


class Streams:
    """The readahead streams of one client (the engine keeps the same
    table in C: same size, same replacement order)."""

    def __init__(self, n: int = STREAMS):
        self.tid = [0] * n
        self.next = [0] * n
        self.window = [0] * n
        self.ahead = [0] * n   # pages the last readahead brought, not yet confirmed
        self.used = [0] * n    # 0: free; else the tick of its last fault
        self.tick = 0
        self.misses = 0

    def fault(self, tid: int, addr: int) -> tuple[int, int]:
        """A swap fault at addr by thread tid: (stream, window)."""
        self.tick += 1
        for k in range(len(self.used)):
            if (self.used[k] and self.tid[k] == tid
                    and self.next[k] <= addr < self.next[k] + self.window[k] * PAGE):
                w = min(self.window[k] * 2, MAX_READAHEAD)
                self.ahead[k] = 0  # walked: the thread came past them
                break
        else:
            k = min(range(len(self.used)), key=lambda j: (self.used[j], j))
            if self.used[k]:
                self.misses += self.ahead[k]
            self.tid[k], self.ahead[k], w = tid, 0, 1
        self.window[k], self.next[k], self.used[k] = w, addr + w * PAGE, self.tick
        return k, w

    def brought(self, k: int, ahead: int) -> None:
        self.ahead[k] = ahead


def bring(state: np.ndarray, batch: np.ndarray, i: int, w: int) -> np.ndarray:
    """Indices of the pages a fault at page i with window w brings."""
    hi = min(i + w, len(state))
    sel = (state[i:hi] == SWAPPED) & (batch[i:hi] == 0)
    return np.flatnonzero(sel) + i


def read_runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """(first position, count) of each read: the pages are packed into one
    buffer in address order, so consecutive pages whose slots are
    consecutive are one read."""
    out, p = [], 0
    while p < len(slots):
        q = p + 1
        while q < len(slots) and slots[q] == slots[q - 1] + 1:
            q += 1
        out.append((p, q - p))
        p = q
    return out


def begin_load(r, idx: np.ndarray, slots: Slots) -> np.ndarray:
    """The pages go LOADING; each slot takes a pin reference while the read
    is in flight (a REMOVE may drop the region's own reference meanwhile,
    and the slot must not be reused under the read). Returns the slots."""
    got = r.slot[idx].copy()
    r.state[idx] = LOADING
    slots.ref(got)
    return got


def still_loading(pages: PageMap, addrs, load_slots) -> list:
    """For each page of a finished load: (region, index) if it is still
    LOADING from the same slot in the current page map, else None (the
    program removed or unmapped it meanwhile)."""
    out = []
    for a, s in zip(np.asarray(addrs).tolist(), np.asarray(load_slots).tolist()):
        r, i = pages.find(a)
        ok = r is not None and r.state[i] == LOADING and r.slot[i] == s
        out.append((r, i) if ok else None)
    return out


def copy_runs(addrs, where: list) -> list[tuple[int, int]]:
    """(first position, count) of each UFFDIO_COPY: pages still loading at
    consecutive addresses (they are consecutive in the buffer too)."""
    out, p, n = [], 0, len(where)
    addrs = np.asarray(addrs).tolist()
    while p < n:
        if where[p] is None:
            p += 1
            continue
        q = p + 1
        while q < n and where[q] is not None and addrs[q] == addrs[q - 1] + PAGE:
            q += 1
        out.append((p, q - p))
        p = q
    return out


def loaded(pages: PageMap, slots: Slots, addrs, load_slots, where: list, done,
           now: int, fault: bool = True) -> tuple[list[tuple[int, int]], list[int]]:
    """Commit a finished load. done[p]: the COPY put page p in. Those pages
    become RESIDENT with no slot (the region's reference goes back), stamped
    now; for a fault, the faulting page (position 0) warms and the pages
    read ahead take its heat (they are the stream's next ones). Pages
    still loading that were not put in go back to SWAPPED. The pins are
    dropped. Returns (FREE runs (address, npages), positions not copied)."""
    addrs = np.asarray(addrs).tolist()
    load_slots = np.asarray(load_slots).tolist()
    heat = -1
    if fault:
        if where[0] is not None and done[0]:
            r, i = where[0]
            r.heat[i] = min(int(r.heat[i]) + 1, 255)
        r, i = pages.find(addrs[0])
        if r is not None:
            heat = int(r.heat[i])
    frees, back = [], []
    for p, w in enumerate(where):
        if w is None:
            continue
        r, i = w
        if done[p]:
            slots.release(int(r.slot[i]))
            r.slot[i] = -1
            r.state[i] = RESIDENT
            r.stamp[i] = now
            if heat >= 0 and p > 0:
                r.heat[i] = heat
            if frees and frees[-1][0] + frees[-1][1] * PAGE == addrs[p]:
                frees[-1] = (frees[-1][0], frees[-1][1] + 1)
            else:
                frees.append((addrs[p], 1))
        else:
            r.state[i] = SWAPPED
            back.append(p)
    slots.release(np.asarray(load_slots, dtype=np.int64))
    return frees, back


def load_failed(pages: PageMap, slots: Slots, addrs, load_slots) -> None:
    """The read failed: the pages still loading go back to SWAPPED (their
    faults are served again later), and the pins are dropped."""
    for w in still_loading(pages, addrs, load_slots):
        if w is not None:
            w[0].state[w[1]] = SWAPPED
    slots.release(np.asarray(load_slots, dtype=np.int64))


def loading_in(pages: PageMap, start: int, end: int) -> bool:
    """Whether a page of [start, end) is still being read back."""
    return any(bool(np.any(r.state[lo:hi] == LOADING))
               for r, lo, hi in pages.overlapping(start, min(end, 1 << 63)))


def zeroed(r, i: int, now: int) -> None:
    """A zero page went in: a page never reclaimed is resident now."""
    if r.state[i] == EMPTY:
        r.state[i] = RESIDENT
        r.stamp[i] = now


def written(r, i: int, now: int) -> None:
    """A write-protect fault let through: the page is being written, so it
    is warm (MADV_FREE'd and kept by the kernel, an EMPTY page written
    again is resident)."""
    if r.state[i] == EMPTY:
        r.state[i] = RESIDENT
    r.heat[i] = min(int(r.heat[i]) + 1, 255)
    r.stamp[i] = now


class Model:
    """The whole fault path of one client as plain Python, with every ioctl
    and read succeeding: what the engine must do to the arrays for the
    same sequence (the system test runs both)."""

    def __init__(self, pages: PageMap, slots: Slots):
        self.pages, self.slots = pages, slots
        self.streams = Streams()
        self.loads: list[tuple[list[int], np.ndarray]] = []  # in flight
        self.frees: list[tuple[int, int]] = []

    def fault(self, addr: int, tid: int = 0, wp: bool = False, now: int = 0) -> int:
        r, i = self.pages.find(addr)
        if r is None:
            return ZERO
        kind = classify(int(r.state[i]), int(r.batch[i]), wp)
        if kind == ZERO:
            zeroed(r, i, now)
        elif kind == UNPROTECT:
            written(r, i, now)
        elif kind == SWAP:
            k, w = self.streams.fault(tid, addr)
            idx = bring(r.state, r.batch, i, w)
            self.streams.brought(k, len(idx) - 1)
            got = begin_load(r, idx, self.slots)
            self.loads.append(((r.start + idx * PAGE).tolist(), got))
        return kind

    def complete(self, now: int = 0) -> None:
        """Every load in flight completes, in the order started."""
        for addrs, got in self.loads:
            where = still_loading(self.pages, addrs, got)
            frees, _ = loaded(self.pages, self.slots, addrs, got, where,
                              [w is not None for w in where], now)
            self.frees += frees
        self.loads = []
