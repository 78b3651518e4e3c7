"""The native fault engine (native/src/engine.c): how it works with the
kernel, and what Python hands it.

One call serves the page faults of one read of a uffd: zero pages and
write-protect releases in contiguous runs, swap-ins queued on the ring as
READ_FIXED into the engine's part of the registered arena (one read per
run of contiguous slots, the page and its readahead in one buffer; plain
READ when the ring did not register its arena), and
io_uring_submit once. Their completions never come back to Python: the
ring hands CQEs whose user_data has the engine's tag to the engine during
the harvest, and the engine puts the pages in with UFFDIO_COPY in runs,
updates the page map and appends FREE journal records to a buffer.

What Python keeps: events (REMOVE, UNMAP, REMAP, FORK must be applied
before the faults of their read, so a read that holds any is handed back
untouched and served again with skip_events once they are applied),
faults a reclaim batch holds, the beacon, and every address an ioctl
refused with EAGAIN (an event is unread; the retry comes after it is).

The page map is numpy's. Each client's table of regions (pointers into
the arrays) is republished whenever PageMap.generation or the PageMap
itself changed, before the engine next runs for that client; the Region
objects are kept while published, so the arrays it points to stay alive.
A closed client is forgotten by the engine at once (it never touches a
reused fd number); its reads in flight only drop their slot pins.
"""
import itertools

import numpy as np

from .._native import ffi, lib
from .errors import check

OUT, JOURNAL, DIRTY, EVENTS = (lib.UFS_ENGINE_OUT, lib.UFS_ENGINE_JOURNAL, lib.UFS_ENGINE_DIRTY,
                               lib.UFS_ENGINE_EVENTS)
HAND, RETRY, FAILED, ERROR, READ = (lib.UFS_OUT_HAND, lib.UFS_OUT_RETRY, lib.UFS_OUT_FAILED,
                                    lib.UFS_OUT_ERROR, lib.UFS_OUT_READ)
EVENT_READ, UFFD_ERROR = lib.UFS_OUT_EVENTS, lib.UFS_OUT_UFFD_ERR
SKIP_EVENTS, NOT_READ = lib.UFS_SERVE_SKIP_EVENTS, lib.UFS_SERVE_NOT_READ
READ_BYTES = 64 * 32  # one read of the uffd: 64 struct uffd_msg
OPS = {lib.UFS_OP_COPY: "UFFDIO_COPY", lib.UFS_OP_ZEROPAGE: "UFFDIO_ZEROPAGE",
       lib.UFS_OP_UNPROTECT: "UFFDIO_WRITEPROTECT"}
SAMPLE_KINDS = {lib.UFS_KIND_ZERO: "zero", lib.UFS_KIND_UNPROTECT: "write_protect",
                lib.UFS_KIND_SWAP: "swap", lib.UFS_KIND_TIER: "tier"}
COUNTERS = ("faults", "zero", "write_protect", "swap", "loading", "unknown", "swapped_in",
            "read_bytes", "refaults", "readahead", "readahead_misses", "restored", "busy",
            "eagain", "copy", "zeropage", "swap_read", "unprotect", "tier_faults", "tier_pages")
C = {name: i for i, name in enumerate(COUNTERS)}
assert len(COUNTERS) == lib.UFS_C_N
STATS = ("bad_release", "stray", "lost", "samples_lost")
OUT_DTYPE = np.dtype([("addr", "<u8"), ("flags", "<u8"), ("tid", "<u4"), ("client", "<u4"),
                      ("kind", "<i4"), ("err", "<i4")])
assert OUT_DTYPE.itemsize == ffi.sizeof("struct ufs_eout")


class Handle:
    """One client as the engine knows it."""

    def __init__(self, engine: "Engine", hid: int, uffd: int):
        self.engine, self.id = engine, hid
        self.counters = np.zeros(lib.UFS_C_N, dtype=np.uint64)
        self.last = self.counters.copy()  # what was already turned into metrics
        # two halves: the engine reads the uffd into one while it serves
        # the other (kept until the engine frees the client: see close)
        self.read_buf = ffi.new("char[]", 2 * READ_BYTES)
        self._c = lib.ufs_engine_client(engine._e, hid, uffd, 0, 0,
                                        ffi.from_buffer("uint64_t[]", self.counters),
                                        self.read_buf, READ_BYTES)
        if self._c == ffi.NULL:
            raise MemoryError("ufs_engine_client")
        self.pages = None
        self.generation = -1
        self.ident = None
        self._table = None
        self._regions = ()

    def delta(self) -> dict[str, int]:
        """The counters that grew since the last call, and by how much."""
        d = self.counters - self.last
        if not d.any():
            return {}
        self.last[:] = self.counters
        return {COUNTERS[i]: int(d[i]) for i in np.flatnonzero(d)}

    def stale(self, pages, cid: int, beacon: int) -> bool:
        return (pages is not self.pages or pages.generation != self.generation
                or self.ident != (cid, beacon))

    def publish(self, pages, cid: int, beacon: int) -> None:
        regions = list(pages.regions)
        table = ffi.new("struct ufs_region[]", max(len(regions), 1))
        for t, r in zip(table, regions):
            t.start, t.npages = r.start, r.npages
            t.state = ffi.from_buffer("uint8_t[]", r.state)
            t.slot = ffi.from_buffer("int64_t[]", r.slot)
            t.batch = ffi.from_buffer("int32_t[]", r.batch)
            t.heat = ffi.from_buffer("uint8_t[]", r.heat)
            t.stamp = ffi.from_buffer("uint32_t[]", r.stamp)
        lib.ufs_engine_publish(self._c, table, len(regions), cid, beacon)
        # the old table may go now: the engine points at the new one
        self._table, self._regions = table, regions
        self.pages, self.generation, self.ident = pages, pages.generation, (cid, beacon)

    def arm(self) -> None:
        """Queue the next read of the uffd (the engine serves what it reads
        and re-arms by itself; a read holding events comes to Python as an
        EVENT_READ out entry, and the reads stop until arm() again)."""
        check(lib.ufs_engine_arm(self._c), "io_uring read of the uffd")

    def serve(self, msgs, nbytes: int, t_ns: int, flags: int = 0) -> int:
        """Serve the page faults of a read; returns the engine's pending bits
        (EVENTS: the read holds events and nothing was done). flags:
        SKIP_EVENTS (they were applied), NOT_READ (faults read earlier)."""
        if not isinstance(msgs, ffi.CData):
            msgs = ffi.from_buffer(msgs)
        return lib.ufs_engine_serve(self._c, msgs, nbytes, t_ns, flags)

    def restore(self, start: int, end: int, max_loads: int = 1 << 30) -> int:
        """Queue reads for the swapped pages of [start, end); pages queued."""
        return lib.ufs_engine_restore(self._c, start, min(end, (1 << 64) - 1), max_loads)

    def close(self) -> None:
        if self._c is not None:
            lib.ufs_engine_close(self._c)
            self._c = None
            self._table, self._regions, self.pages = None, (), None
            # a read of the uffd may still be on its way into read_buf (it
            # is cancelled): the engine keeps the buffer until it is done
            # (its cancel completes within a harvest or two; 64 closes later
            # it is long done)
            self.engine._graveyard.append(self.read_buf)
            del self.engine._graveyard[:-64]


class Engine:
    def __init__(self, ring, base: int, nbytes: int):
        err = ffi.new("int *")
        e = lib.ufs_engine_new(ring._r, ffi.cast("void *", base), nbytes, err)
        if e == ffi.NULL:
            check(err[0], "ufs_engine_new")
        self._e = e
        self.ring = ring
        # a ring without a registered arena gets plain reads (system/ring.py)
        lib.ufs_engine_set_fixed(e, int(getattr(ring, "registered", True)))
        self._view = ffi.new("struct ufs_eview *")
        self._ids = itertools.count(1)
        self.handles: dict[int, Handle] = {}
        self._slots = None
        self._stats = ffi.new("uint64_t[]", lib.UFS_ENGINE_NSTATS)
        self._graveyard: list = []  # read buffers of closed clients
        self._tier = None


    def set_swap(self, fd: int, slots, rw_flags: int = 0, report_reads: bool = False) -> None:
        """The swap file and its slot counts (the engine releases slots in
        place, exactly as Slots.release does)."""
        self._slots = slots  # kept: the engine points into its arrays
        lib.ufs_engine_set_swap(self._e, fd, rw_flags, int(report_reads),
                                ffi.from_buffer("uint16_t[]", slots.refs),
                                ffi.from_buffer("int64_t[]", slots.counters), len(slots.refs))

    @property
    def slots(self):
        return self._slots

    def set_tier(self, tier) -> None:
        """Serve swap-ins from a RamTier first (None: the device only). The
        engine drops a slot's entry when it frees the slot."""
        old = self._tier
        if old is not None and self in old._engines:
            old._engines.remove(self)
        self._tier = tier
        if self._e is not None:
            lib.ufs_engine_set_tier(self._e, ffi.NULL if tier is None else tier._ptr())
        if tier is not None:
            tier._engines.append(self)

    @property
    def tier(self):
        return self._tier

    def set_poll(self, us: int) -> None:
        """Spin up to `us` µs on the CQ after queueing reads."""
        lib.ufs_engine_set_poll(self._e, max(0, int(us)))

    def client(self, uffd: int) -> Handle:
        h = Handle(self, next(self._ids), uffd)
        self.handles[h.id] = h
        return h

    def forget(self, h: Handle) -> None:
        h.close()
        self.handles.pop(h.id, None)

    @property
    def busy(self) -> int:
        """Loads in flight."""
        return lib.ufs_engine_busy(self._e)

    def stats(self) -> dict:
        lib.ufs_engine_stats(self._e, self._stats)
        return {k: int(self._stats[i]) for i, k in enumerate(STATS)}

    def pending(self) -> int:
        return lib.ufs_engine_view(self._e, self._view)

    def take(self) -> tuple[np.ndarray | None, bytes]:
        """What Python must do (out entries) and the FREE records, taken out
        of the engine (so a handler that calls it again starts afresh)."""
        v = self._view
        p = lib.ufs_engine_view(self._e, v)
        outs = None
        records = b""
        if p & OUT and v.nout:
            outs = np.frombuffer(ffi.buffer(v.out, v.nout * OUT_DTYPE.itemsize),
                                 dtype=OUT_DTYPE).copy()
        if p & JOURNAL and v.njournal:
            records = bytes(ffi.buffer(v.journal, v.njournal))
        lib.ufs_engine_consumed(self._e, p & (OUT | JOURNAL))
        return outs, records

    def samples(self) -> list[tuple[str, int, float]]:
        """(kind, faults, seconds) since the last call."""
        v = self._view
        lib.ufs_engine_view(self._e, v)
        got = [(SAMPLE_KINDS.get(v.samples[i].kind, "zero"), v.samples[i].n,
                v.samples[i].ns / 1e9) for i in range(v.nsamples)]
        lib.ufs_engine_consumed(self._e, DIRTY)
        return got

    def close(self) -> None:
        for h in list(self.handles.values()):
            self.forget(h)
        if self.tier is not None:
            self.set_tier(None)
        if self._e is not None:
            lib.ufs_engine_free(self._e)
            self._e = None
