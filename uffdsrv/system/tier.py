"""The compressed RAM tier (native/src/tier.c): a compressed cache of the
disk tier, keyed by swap slot, in the server's own memory.

Why a cache and not a tier of its own: a page that lives only in a
server's memory dies with that server, and the kernel gives no way to keep
it (a `kill -9` frees the mapping at once). So reclaim still writes every
page to its slot on the device first, O_DIRECT, before the SWAP record and
the zap, and only then compresses the batch into the pool. A fault on a
slot in the pool is a decompress and a UFFDIO_COPY inside the fault engine
with no I/O; a miss reads the device. A full pool simply forgets its oldest
entries (their "writeback" happened already), and a graceful stop has
nothing to write back.

The one rule that keeps the pool right: an entry for slot S is valid only
if it was stored after the last write of S. `store` drops its slots before
it stores them, the engine drops a slot when it frees it, and so must
whoever else frees a slot (`drop`): a slot reused by another page with an
entry left behind would hand that page's owner the old page's bytes.

How the kernel treats the pool's memory: it is one anonymous mapping
reserved with MAP_NORESERVE, so a page of it costs memory only once
written; the pool hands wholly free pages back with MADV_DONTNEED at once,
so `pool_bytes` is memory held now (plus the slot index), never a peak. It
is counted against the memory saved wherever that is reported.

lz4 (LZ4_compress_default) is the default: ~10x faster than zstd level 1
to compress, for a few percent less ratio; zstd (level 1, a context kept
per pool) is the option. A page whose every 8-byte word is equal (zeros,
but also 0xffff..., a memset pattern) is one 8-byte value and no arena
bytes, as zram's same-filled pages are.

Threads: `store` may run in a worker thread (cffi lets go of the GIL for
the call) while the loop's engine looks pages up and frees slots: the pool
takes a mutex only to insert, and a slot dropped while its page is still
being compressed gets no entry (a generation per slot). `close` waits for
the stores in flight.
"""
import asyncio
import threading

import numpy as np

from .._native import ffi, lib
from ..core.pages import PAGE
from .errors import check

CODECS = {"lz4": 0, "zstd": 1}
STATS = ("cap_bytes", "pool_bytes", "stored_bytes", "stored_pages", "same_pages",
         "rejected_pages", "evicted_pages", "dropped_pages", "hits", "misses", "hit_ns")


def _int64s(a) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_1d(np.asarray(a, dtype=np.int64)))


class RamTier:
    """A pool capped at cap_bytes (its index included) for slots
    0..nslots-1. Pages that compress to more than max_stored bytes are not
    stored (the disk has them)."""

    def __init__(self, cap_bytes: int, nslots: int, codec: str = "lz4",
                 max_stored: int = 3072):
        if codec not in CODECS:
            raise ValueError(f"ufs_tier_new: unknown codec {codec!r} (one of {', '.join(CODECS)})")
        err = ffi.new("int *")
        t = lib.ufs_tier_new(int(cap_bytes), int(nslots), CODECS[codec], int(max_stored), err)
        if t == ffi.NULL:
            check(err[0] or -12, "ufs_tier_new")
        self._t = t
        self.codec, self.nslots, self.max_stored = codec, int(nslots), int(max_stored)
        self._stats = ffi.new("struct ufs_tier_stats *")
        self._page = ffi.new("char[]", PAGE)
        self._engines: list = []  # engines that point at the pool (detached on close)
        self._idle = threading.Condition()
        self._storing = 0  # store calls in flight (in worker threads)

    def _ptr(self):
        if self._t is None:
            raise ValueError("ufs_tier: the pool is closed")
        return self._t

    def store(self, buf_addr: int, positions, slots) -> int:
        """Store page i of the batch, at buf_addr + positions[i]*PAGE, under
        slots[i]. Call it after the pages are on the device. Returns how
        many were stored (the rest were rejected: disk only). Any thread;
        the buffer must stay as it is until it returns."""
        pos, sl = _int64s(positions), _int64s(slots)
        if len(pos) != len(sl):
            raise ValueError("ufs_tier_store: positions and slots differ in length")
        if not len(sl):
            return 0
        with self._idle:
            t = self._ptr()
            self._storing += 1
        try:
            return int(lib.ufs_tier_store(t, ffi.cast("void *", buf_addr),
                                          ffi.from_buffer("int64_t[]", pos),
                                          ffi.from_buffer("int64_t[]", sl), len(sl)))
        finally:
            with self._idle:
                self._storing -= 1
                self._idle.notify_all()

    async def store_off_loop(self, executor, buf_addr: int, positions, slots) -> int:
        """store() in executor's thread, the loop free meanwhile. The buffer
        is read until that store returns, so a cancelled caller still waits
        for it before the CancelledError goes on (and the buffer with it)."""
        fut = asyncio.get_running_loop().run_in_executor(executor, self.store, buf_addr,
                                                         positions, slots)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():
                try:
                    await asyncio.wait([fut])
                except asyncio.CancelledError:
                    pass
            raise

    def drop(self, slots) -> None:
        """Forget these slots (freed, or about to be written again)."""
        sl = _int64s(slots)
        if len(sl):
            lib.ufs_tier_drop(self._ptr(), ffi.from_buffer("int64_t[]", sl), len(sl))

    def sweep(self, refs) -> int:
        """Drop every entry whose slot count in refs (Slots.refs) is 0: the
        slots Python freed without a drop. Costs one pass over the
        entries; returns how many went."""
        refs = np.ascontiguousarray(refs, dtype=np.uint16)
        return int(lib.ufs_tier_sweep(self._ptr(), ffi.from_buffer("uint16_t[]", refs), len(refs)))

    def load(self, slot: int) -> bytes | None:
        """The page stored under slot, or None (counted as a hit or a miss)."""
        if lib.ufs_tier_load(self._ptr(), int(slot), self._page):
            return bytes(ffi.buffer(self._page, PAGE))
        return None

    def stats(self) -> dict[str, int]:
        lib.ufs_tier_stats(self._ptr(), self._stats)
        return {k: int(getattr(self._stats, k)) for k in STATS}

    def close(self) -> None:
        if self._t is None:
            return
        with self._idle:  # a store in a worker still uses the pool
            self._idle.wait_for(lambda: not self._storing)
            t, self._t = self._t, None
        for e in list(self._engines):  # set_tier takes e off the list
            e.set_tier(None)
        self._engines.clear()
        lib.ufs_tier_free(t)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
