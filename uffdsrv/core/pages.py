"""The page map: what the server knows about every managed page.

One compact Region per managed mapping holds numpy arrays, a few bytes per
page, never a Python object per page (a managed GiB is 262,144 pages):

  state   EMPTY     not present; a fault gets the zero page
          RESIDENT  present in the program
          INFLIGHT  write-protected, being copied out for reclaim
          SWAPPED   its bytes are only in swap slot `slot`
          LOADING   being read back from `slot` for a fault
  slot    swap slot, -1 for none
  expect  how many REMOVE events the server's own pending zaps will still
          raise on this page (counted per page: a VMA split turns one
          requested range into several events, and the program's own
          MADV_DONTNEED can overlap a zap)
  batch   id of the reclaim batch that holds this page, 0 for none
  heat    how often the page came back soon after it was reclaimed (a
          refault, or a write while it was in flight), halved now and then
  stamp   when it last became resident (ms): the order of arrival

Who owns a slot reference: the region, for SWAPPED and LOADING pages with
batch 0; the batch, for every page it holds (it hands the reference to the
region when it settles a page that ended SWAPPED).

Transitions are applied here, as plain functions of events; the shell turns
what they return into ioctls.
"""
import bisect

import numpy as np

from .ranges import PAGE
from .ranges import runs as _runs
from .slots import Slots

EMPTY, RESIDENT, INFLIGHT, SWAPPED, LOADING = range(5)
STATE_NAMES = ("empty", "resident", "inflight", "swapped", "loading")


class Region:
    __slots__ = ("start", "npages", "state", "slot", "expect", "batch", "heat", "stamp")

    def __init__(self, start: int, npages: int):
        self.start = start
        self.npages = npages
        self.state = np.zeros(npages, dtype=np.uint8)
        self.slot = np.full(npages, -1, dtype=np.int64)
        self.expect = np.zeros(npages, dtype=np.uint8)
        self.batch = np.zeros(npages, dtype=np.int32)
        self.heat = np.zeros(npages, dtype=np.uint8)
        self.stamp = np.zeros(npages, dtype=np.uint32)

    @property
    def end(self) -> int:
        return self.start + self.npages * PAGE

    def part(self, lo: int, hi: int, start: int | None = None) -> "Region":
        r = Region(self.start + lo * PAGE if start is None else start, hi - lo)
        r.state[:] = self.state[lo:hi]
        r.slot[:] = self.slot[lo:hi]
        r.expect[:] = self.expect[lo:hi]
        r.batch[:] = self.batch[lo:hi]
        r.heat[:] = self.heat[lo:hi]
        r.stamp[:] = self.stamp[lo:hi]
        return r

    def __repr__(self):
        return f"Region({self.start:#x}-{self.end:#x})"


def _region_owned(r: Region, lo: int, hi: int) -> np.ndarray:
    st = r.state[lo:hi]
    return (r.batch[lo:hi] == 0) & ((st == SWAPPED) | (st == LOADING))


class PageMap:
    def __init__(self):
        self.regions: list[Region] = []
        self._starts: list[int] = []
        # bumped whenever the list of regions (or their arrays) changes: the
        # native fault engine holds pointers into them and is told anew
        self.generation = 0

    # --- lookup ------------------------------------------------------------
    def find(self, addr: int) -> tuple[Region | None, int]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.end:
                return r, (addr - r.start) // PAGE
        return None, -1

    def overlapping(self, start: int, end: int):
        """(region, lo, hi) for every region part inside [start, end)."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        for r in self.regions[i:]:
            if r.start >= end:
                break
            if r.end <= start:
                continue
            lo = max(start, r.start) - r.start
            hi = min(end, r.end) - r.start
            out.append((r, lo // PAGE, (hi + PAGE - 1) // PAGE))
        return out

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of [start, end) that no region covers."""
        out, at = [], start
        for r, lo, hi in self.overlapping(start, end):
            s = r.start + lo * PAGE
            if s > at:
                out.append((at, s))
            at = r.start + hi * PAGE
        if at < end:
            out.append((at, end))
        return out

    def _insert(self, r: Region) -> None:
        i = bisect.bisect_left(self._starts, r.start)
        self._starts.insert(i, r.start)
        self.regions.insert(i, r)
        self.generation += 1

    def add(self, start: int, end: int, present: np.ndarray | None = None,
            now: int = 0) -> Region:
        """A newly managed range: the present pages are resident (arrived
        `now`, in ms), the rest empty."""
        if self.overlapping(start, end):
            raise ValueError(f"{start:#x}-{end:#x} overlaps a managed region")
        r = Region(start, (end - start) // PAGE)
        if present is not None:
            r.state[present] = RESIDENT
        r.stamp[:] = now
        self._insert(r)
        return r

    def states_at(self, addrs: np.ndarray) -> np.ndarray:
        """The state of the page at each sorted address; 255 where no
        region covers it."""
        addrs = np.asarray(addrs, dtype=np.int64)
        out = np.full(len(addrs), 255, dtype=np.uint8)
        if len(addrs):
            for r, _, _ in self.overlapping(int(addrs[0]), int(addrs[-1]) + PAGE):
                m = (addrs >= r.start) & (addrs < r.end)
                out[m] = r.state[(addrs[m] - r.start) // PAGE]
        return out

    # --- counts ------------------------------------------------------------
    def count(self, state: int) -> int:
        return sum(int(np.count_nonzero(r.state == state)) for r in self.regions)

    def not_present(self, start: int, end: int) -> int:
        """Pages of [start, end) whose bytes are not (only) in the program:
        swapped, loading, or in a batch whose zap may still run. A range
        with any must stay registered: unregistered, they read as zeros."""
        return sum(int(np.count_nonzero((r.state[lo:hi] == SWAPPED) | (r.state[lo:hi] == LOADING)
                                        | (r.state[lo:hi] == INFLIGHT)))
                   for r, lo, hi in self.overlapping(start, end))

    @property
    def managed_pages(self) -> int:
        return sum(r.npages for r in self.regions)

    # --- events --------------------------------------------------------------
    def drop(self, start: int, end: int, slots: Slots, release: bool = True) -> None:
        """munmap: the pages are gone. Their region-owned slots are freed;
        batch-held pages are settled by their batch, which no longer finds
        them."""
        for r, lo, hi in self.overlapping(start, end):
            if release:
                owned = _region_owned(r, lo, hi)
                slots.release(r.slot[lo:hi][owned])
            i = self.regions.index(r)
            del self.regions[i]
            del self._starts[i]
            self.generation += 1
            if lo > 0:
                self._insert(r.part(0, lo))
            if hi < r.npages:
                self._insert(r.part(hi, r.npages))

    def remap(self, frm: int, to: int, length: int, slots: Slots) -> None:
        """mremap moved [frm, frm+length) to `to`. The state moves along; a
        page held by a reclaim batch leaves it (its zap targets the old
        address): it stays protected and resident at the new place, and
        write faults there release it."""
        moved = []
        for r, lo, hi in self.overlapping(frm, frm + length):
            part = r.part(lo, hi, start=to + (r.start + lo * PAGE - frm))
            held = part.batch != 0
            committed = held & (part.state == SWAPPED)
            slots.ref(part.slot[committed])
            part.state[held & (part.state == INFLIGHT)] = RESIDENT
            part.state[part.state == LOADING] = SWAPPED  # its swap-in was for the old address
            part.slot[held & ~committed] = -1
            part.batch[:] = 0
            part.expect[:] = 0
            moved.append(part)
        self.drop(frm, frm + length, slots, release=False)
        self.drop(to, to + length, slots)
        for part in moved:
            self._insert(part)

    def remove(self, start: int, end: int, slots: Slots) -> list[tuple[int, int]]:
        """A REMOVE event (MADV_DONTNEED/MADV_FREE): pages our pending zaps
        expect become swapped (or empty, for pages that were all zeros);
        every other page is the program's own and reads back as zeros.
        Returns (address, npages) of the runs that no longer hold a slot."""
        freed = []
        for r, lo, hi in self.overlapping(start, end):
            st, sl = r.state[lo:hi], r.slot[lo:hi]
            exp, batch = r.expect[lo:hi], r.batch[lo:hi]
            ours = exp > 0
            exp[ours] -= 1
            landed = ours & (st == INFLIGHT)
            st[landed & (sl >= 0)] = SWAPPED
            st[landed & (sl < 0)] = EMPTY
            theirs = ~ours
            lost = np.flatnonzero(theirs & (st >= SWAPPED))
            if len(lost):
                first, count = _runs(lost)
                freed += [(r.start + (lo + int(f)) * PAGE, int(c))
                          for f, c in zip(first.tolist(), count.tolist())]
            slots.release(sl[theirs & _region_owned(r, lo, hi)])
            st[theirs] = EMPTY
            sl[theirs] = -1
            del batch  # batch-held pages keep their batch until it settles
        return freed

    def fork(self, slots: Slots) -> "PageMap":
        """The child's page map at the moment of fork: what is resident or
        in flight here is resident there; what is reclaimed is shared, and
        the child takes its own reference on each slot."""
        child = PageMap()
        for r in self.regions:
            c = r.part(0, r.npages)
            c.state[c.state == INFLIGHT] = RESIDENT
            c.state[c.state == LOADING] = SWAPPED
            shared = c.state == SWAPPED
            c.slot[~shared] = -1
            slots.ref(c.slot[shared])
            c.expect[:] = 0
            c.batch[:] = 0
            child._insert(c)
        return child

    def release_all(self, slots: Slots) -> None:
        """The process is gone: free every slot its regions own."""
        for r in self.regions:
            slots.release(r.slot[_region_owned(r, 0, r.npages)])
        self.regions.clear()
        self._starts.clear()
        self.generation += 1
