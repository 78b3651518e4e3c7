"""Swap slots: one 4 KiB slot per reclaimed page, reference-counted because
a forked child shares its parent's reclaimed pages until either side faults
them back.

Allocation takes the lowest free slots first: pages reclaimed together land
next to each other (one write, one readahead), and the low end of the file
is rewritten instead of growing a sparse file (overwrites ran 10x faster
than first writes here). A slot is free only when its count is 0: nobody
holds its bytes and no I/O is in flight on it, so one client's bytes never
reach another.
"""
import numpy as np


class SwapFull(Exception):
    pass


class Slots:
    def __init__(self, nslots: int):
        self.refs = np.zeros(nslots, dtype=np.uint16)
        # used, and the lowest index that may be free: in one array so the
        # native fault engine updates them in place when it frees a slot
        self.counters = np.zeros(2, dtype=np.int64)

    @property
    def used(self) -> int:
        return int(self.counters[0])

    @used.setter
    def used(self, n: int) -> None:
        self.counters[0] = n

    @property
    def _low(self) -> int:  # no free slot below this index
        return int(self.counters[1])

    @_low.setter
    def _low(self, i: int) -> None:
        self.counters[1] = i

    @property
    def nslots(self) -> int:
        return len(self.refs)

    @property
    def free(self) -> int:
        return self.nslots - self.used

    def alloc(self, n: int) -> np.ndarray:
        """Up to n free slots, lowest first, each with count 1. Fewer when the
        file is nearly full; an empty array when it is full."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        got = np.flatnonzero(self.refs[self._low:] == 0)[:n] + self._low
        if len(got):
            self.refs[got] = 1
            self.used += len(got)
            self._low = int(got[-1]) + 1
        return got.astype(np.int64)

    def ref(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        slots = slots[slots >= 0]
        if len(slots):
            if np.any(self.refs[slots] == 0):
                raise ValueError("ref of a free slot")
            # one call never names a slot twice: no page map holds a slot
            # in two pages, so plain fancy indexing counts right
            self.refs[slots] += 1

    def release(self, slots) -> None:
        if isinstance(slots, int):  # the fault path's one page, without numpy
            if slots >= 0:
                if self.refs[slots] == 0:
                    raise ValueError("release of a free slot")
                self.refs[slots] -= 1
                if self.refs[slots] == 0:
                    self.used -= 1
                    self._low = min(self._low, slots)
            return
        slots = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        slots = slots[slots >= 0]
        if not len(slots):
            return
        if np.any(self.refs[slots] == 0) or len(np.unique(slots)) != len(slots):
            raise ValueError("release of a free slot, or of one slot twice in a call")
        self.refs[slots] -= 1
        freed = slots[self.refs[slots] == 0]
        if len(freed):
            self.used -= len(freed)
            self._low = min(self._low, int(freed.min()))
