"""Swap slots: one 4 KiB slot per reclaimed page, reference-counted because
a forked child shares its parent's reclaimed pages until either side faults
them back.

Where a batch lands decides what a later fault-in costs. Readahead goes by
virtual address, so a region's neighbours should be neighbours on the
device too: then the pages a fault brings along come in one read. Taking
the lowest free slots one by one (as this allocator once did) breaks that
after random fault-ins: the freed slots are scattered holes, and the next
batch, of this region or another, is spread over them.

So allocation works like the kernel's swap clusters (mm/swapfile.c):

1. a batch of n pages takes the first run of n free slots, counted from
   the low end of the file (first fit), so the file's low end keeps being
   reused and a batch stays one contiguous write;
2. only when no such run is left (the file is full or fragmented) does it
   fill CLUSTER-sized clusters: wholly free clusters first, then the free
   slots of partly used ones, lowest cluster first, so what contiguity is
   left is used before single holes are.

The file is preallocated at start (server/swap.py), so reusing the low end
is no longer what makes writes fast; contiguity is what makes reads fast.

A slot is free only when its count is 0: nobody holds its bytes and no I/O
is in flight on it, so one client's bytes never reach another.
"""
import numpy as np

CLUSTER = 512  # slots per cluster: 2 MiB, as the kernel's swap clusters
_WINDOW = 1 << 16  # slots looked at first by a first-fit search


class SwapFull(Exception):
    pass


def _free_runs(free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], free, [False])).view(np.int8)))
    return edges[0::2], edges[1::2] - edges[0::2]


class Slots:
    def __init__(self, nslots: int):
        self.refs = np.zeros(nslots, dtype=np.uint16)
        # used, and the lowest index that may be free (no slot below it is
        # free): in one array so the native fault engine updates them in
        # place when it frees a slot
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
        """Up to n free slots, each with count 1: one contiguous run when
        there is one (the lowest that fits), else the free slots of wholly
        free clusters, then of partly used ones, lowest first. Fewer when
        the file is nearly full; an empty array when it is full."""
        if n <= 0 or self.used >= self.nslots:
            return np.zeros(0, dtype=np.int64)
        start = self._first_fit(n)
        if start is not None:
            got = np.arange(start, start + n, dtype=np.int64)
        else:
            got = self._from_clusters(n)
        if len(got):
            self.refs[got] = 1
            self.used += len(got)
            self._advance_low()
        return got

    def _first_fit(self, n: int) -> int | None:
        """Start of the lowest run of n free slots, or None. Looks at a
        window above _low first and widens it only when no run fits there:
        the usual case (free space above what is in use) costs one window."""
        refs, lo = self.refs, self._low
        size = max(_WINDOW, 4 * n)
        while lo < self.nslots:
            hi = min(self.nslots, lo + size)
            starts, lens = _free_runs(refs[lo:hi] == 0)
            fit = np.flatnonzero(lens >= n)
            if len(fit):
                return lo + int(starts[fit[0]])
            if hi == self.nslots:
                return None
            # a run reaching the window's end may go on past it: look at it
            # whole in the next, wider window
            tail = len(starts) and starts[-1] + lens[-1] == hi - lo
            lo = lo + int(starts[-1]) if tail else hi
            size *= 2
        return None

    def _from_clusters(self, n: int) -> np.ndarray:
        free = np.flatnonzero(self.refs == 0)
        if not len(free):
            return np.zeros(0, dtype=np.int64)
        cluster = free // CLUSTER
        per_cluster = np.bincount(cluster, minlength=cluster[-1] + 1)
        size = np.minimum(CLUSTER, self.nslots - np.arange(len(per_cluster)) * CLUSTER)
        whole = (per_cluster == size)[cluster]
        # wholly free clusters first, then partly used ones; by address in each
        order = np.lexsort((free, ~whole))
        return free[order[:n]].astype(np.int64)

    def _advance_low(self) -> None:
        lo = self._low
        while lo < self.nslots:
            free = np.flatnonzero(self.refs[lo:lo + _WINDOW] == 0)
            if len(free):
                self._low = lo + int(free[0])
                return
            lo += _WINDOW
        self._low = self.nslots

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
