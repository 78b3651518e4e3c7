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
        self.held: list[int] = []  # fault addresses waiting for the batch to settle
        region.state[idx] = INFLIGHT
        region.batch[idx] = self.id

    def __len__(self):
        return len(self.addrs)

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
        every other slot goes back. Returns the addresses to unprotect."""
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


def cancel_page(region: Region, idx: int) -> None:
    """A write reached a page before its zap was sent: it stays resident
    (its slot goes back when the batch settles)."""
    region.state[idx] = RESIDENT
    region.slot[idx] = -1


__all__ = ["Batch", "cancel_page", "EMPTY"]
