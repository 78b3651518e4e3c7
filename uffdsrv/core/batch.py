"""A reclaim batch, as bookkeeping: which pages it holds, the slots it
owns, and how it settles once the zap has been answered.

The order that makes reclaim safe (write-protect, copy out, write the swap
I/O to completion, *then* zap) is run by the shell in server/reclaim.py;
this module decides what each page becomes at each step.
"""
import itertools

import numpy as np

from .pages import EMPTY, INFLIGHT, PAGE, RESIDENT, SWAPPED, PageMap, Region
from .slots import Slots

_ids = itertools.count(1)


class Batch:
    def __init__(self, region: Region, idx: np.ndarray):
        self.id = next(_ids)
        self.base = region.start
        self.addrs = region.start + idx.astype(np.int64) * PAGE
        self.slots = np.full(len(idx), -1, dtype=np.int64)
        self.zap_sent = False
        self.settled = False
        self.answer = None  # the shell's wait for the zap's answer, while it may come
        self.held: list[int] = []  # fault addresses waiting for the batch to settle
        region.state[idx] = INFLIGHT
        region.batch[idx] = self.id

    def __len__(self):
        return len(self.addrs)

    @classmethod
    def recovered(cls, pages: PageMap, region: Region, pending: np.ndarray,
                  gaps: np.ndarray) -> "Batch":
        """After a takeover: the pages whose zap a dead server may have sent
        (journal.refine), held as a batch whose zap was sent, so that
        faults on them wait and the REMOVEs still to come are expected.
        Pending pages keep their slots, through the batch."""
        slots_of = region.slot[pending].copy()
        b = cls(region, pending)
        b.set_slots(pages, np.arange(len(pending)), slots_of)
        b.add_gaps(region, gaps)
        b.expect_zap(pages, np.arange(len(b)))
        return b

    def give_back(self, pages: PageMap, positions: np.ndarray) -> None:
        """Pages the swap file has no room for stay resident and out of the
        zap (they stay write-protected until their next write faults)."""
        sel = np.zeros(len(self.addrs), dtype=bool)
        sel[positions] = True
        for r, idx, pos in self._located(pages):
            r.state[idx[sel[pos]]] = RESIDENT

    def _located(self, pages: PageMap):
        """(region, page index, position in batch) of the pages this batch
        still holds."""
        out = []
        if not len(self.addrs):
            return out
        for r, lo, hi in pages.overlapping(int(self.addrs[0]), int(self.addrs[-1]) + PAGE):
            pos = np.flatnonzero((self.addrs >= r.start + lo * PAGE)
                                 & (self.addrs < r.start + hi * PAGE))
            idx = (self.addrs[pos] - r.start) // PAGE
            mine = r.batch[idx] == self.id
            out.append((r, idx[mine], pos[mine]))
        return out

    def inflight(self, pages: PageMap) -> np.ndarray:
        """Positions of pages still in flight (not written to by the
        program, not removed, not unmapped)."""
        keep = [pos[r.state[idx] == INFLIGHT] for r, idx, pos in self._located(pages)]
        return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)

    def add_gaps(self, region: Region, gaps: np.ndarray) -> np.ndarray:
        """Take the bridged gap pages into the batch before its zap: faults
        on them wait for the batch like its own pages', and a swapped one's
        slot is held by the batch until it settles (the REMOVE the zap
        raises on it is expected and changes nothing). Returns their
        positions in the batch."""
        if not len(gaps):
            return np.zeros(0, dtype=np.int64)
        addrs = region.start + gaps.astype(np.int64) * PAGE
        order = np.argsort(np.concatenate((self.addrs, addrs)), kind="stable")
        self.addrs = np.concatenate((self.addrs, addrs))[order]
        gap_slots = np.where(region.state[gaps] == SWAPPED, region.slot[gaps], -1)
        self.slots = np.concatenate((self.slots, gap_slots))[order]
        region.batch[gaps] = self.id
        return np.flatnonzero(order >= len(order) - len(gaps))

    def set_slots(self, pages: PageMap, positions: np.ndarray, slots: np.ndarray) -> None:
        self.slots[positions] = slots
        for r, idx, pos in self._located(pages):
            r.slot[idx] = self.slots[pos]

    def expect_zap(self, pages: PageMap, positions: np.ndarray) -> None:
        self.zap_sent = True
        sel = np.zeros(len(self.addrs), dtype=bool)
        sel[positions] = True
        for r, idx, pos in self._located(pages):
            r.expect[idx[sel[pos]]] += 1

    def settle(self, pages: PageMap, slots: Slots) -> np.ndarray:
        """The batch is over: every REMOVE its zap caused has been applied.
        Pages that ended SWAPPED keep their slot (the region owns it now);
        pages still in flight were not zapped and become resident again;
        every other slot goes back. Returns the addresses to unprotect.
        A batch settles once: a second call (two paths that each thought
        the batch was theirs to end) changes nothing, where it would hand
        the same slots back twice."""
        if self.settled:
            return np.zeros(0, np.int64)
        self.settled = True
        keep = np.zeros(len(self.addrs), dtype=bool)
        unprotect = []
        for r, idx, pos in self._located(pages):
            st = r.state[idx]
            swapped = (st == SWAPPED) & (r.slot[idx] == self.slots[pos])
            keep[pos[swapped]] = True
            back = st == INFLIGHT
            r.state[idx[back]] = RESIDENT
            r.slot[idx[back]] = -1
            r.expect[idx] = 0
            r.batch[idx] = 0
            unprotect.append(self.addrs[pos[back]])
            # a zero page that was zapped stays EMPTY, nothing to keep
            del st
        slots.release(self.slots[~keep])
        self.slots[:] = -1
        return np.concatenate(unprotect) if unprotect else np.zeros(0, np.int64)


def bridgeable_gaps(region: Region, idx: np.ndarray, max_gap: int,
                    absent: np.ndarray | None = None) -> np.ndarray:
    """Pages between the sorted pages idx that may go into the same range:
    gaps of at most max_gap pages that are swapped and not held by a batch,
    so certainly absent (an "empty" page may still be present: MADV_FREE
    leaves pages in place, and the program may write them again without a
    fault). Write-protecting or zapping those does nothing to them, and one
    range instead of many saves an ioctl, a REMOVE round trip and a TLB
    flush each. With `absent` (pagemap's word for the pages idx[0]..idx[-1])
    empty pages that are really absent may be stepped over as well: until
    the zap is answered, nothing but a fault (which waits for the batch)
    can make them present. Returns the gap pages."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) < 2:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    st, held = region.state[lo:hi], region.batch[lo:hi]
    ok = (st == SWAPPED) & (held == 0)
    if absent is not None:
        ok |= (st == EMPTY) & (held == 0) & absent
    blocked = ~ok
    cs = np.concatenate(([0], np.cumsum(blocked)))
    a, b = idx[:-1] - lo + 1, idx[1:] - lo  # gap i is [a, b)
    gap = b - a
    ok = (gap > 0) & (gap <= max_gap) & (cs[b] - cs[a] == 0)
    if not ok.any():
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, e) for s, e in zip(a[ok] + lo, b[ok] + lo)])


def cancel_page(region: Region, idx: int) -> None:
    """A write reached a page before its zap was sent: it stays resident
    (its slot goes back when the batch settles)."""
    region.state[idx] = RESIDENT
    region.slot[idx] = -1


__all__ = ["Batch", "cancel_page", "EMPTY"]
