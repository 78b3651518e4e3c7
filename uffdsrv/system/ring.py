"""io_uring: how the kernel behaves, and how the server uses it.

One ring serves the whole server. Each operation carries a 64-bit
user_data; the ring maps it back to a Python callback when its completion
is harvested. Completions are announced on an eventfd (registered with the
ring) that the asyncio loop watches, so the loop sleeps in epoll and wakes
for completions and sockets alike.

A read of a non-blocking uffd through the ring does not block a kernel
worker: io_uring tries it, gets EAGAIN, arms a poll on the uffd and retries
when the uffd becomes readable, then posts the completion (as task work on
our thread, which our next syscall runs). One read returns a batch of
`uffd_msg`s. io_uring has no opcode for uffd ioctls: those stay
synchronous, batched in C.

Swap I/O goes to and from one buffer arena. Registering it
(io_uring_register_buffers, READ_FIXED/WRITE_FIXED) makes the kernel pin
its pages once instead of on every request, but pinning is faulting in:
a registered 64 MiB arena is 64 MiB of the server's RSS from the start,
used or not, and it is what a budget's memory figure counts. Unregistered,
the arena is a MAP_NORESERVE mapping that costs a page only once written,
and each O_DIRECT request pins its own pages for its duration (a few
hundred ns a page against a ~22 µs device read here). The fault engine's
buffers are taken last-freed-first, so the few in use stay the ones
touched. So the arena is registered only on request (register=True, or
UFFDSRV_RING_REGISTER=1); `discard` gives a released buffer's pages back.

Submission is batched: prep calls queue SQEs and one io_uring_enter per
event-loop turn submits them all (the flush is scheduled on first use).
"""
import asyncio
import itertools
import logging
import mmap
import os

import numpy as np

from .._native import ffi, lib
from .errors import check
from .uffd import _ptr, _u64

log = logging.getLogger("uffdsrv.ring")


REGISTER = os.environ.get("UFFDSRV_RING_REGISTER", "0") == "1"


class Ring:
    def __init__(self, entries: int = 1024, arena_bytes: int = 64 << 20,
                 register: bool | None = None):
        self._r = None
        self.registered = REGISTER if register is None else register
        self._loop: asyncio.AbstractEventLoop | None = None
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            err = ffi.new("int *")
            r = lib.ufs_ring_new(entries, self.eventfd, err)
            if r == ffi.NULL:
                check(err[0], "io_uring_queue_init")
            self._r = r
            self.arena = mmap.mmap(-1, arena_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                   | getattr(mmap, "MAP_NORESERVE", 0x4000))
            self.arena_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.arena)))
            if self.registered:
                check(lib.ufs_ring_register_buffer(self._r, ffi.cast("void *", self.arena_addr),
                                                   arena_bytes), "io_uring_register_buffers")
        except BaseException:
            self.close()
            raise
        self._callbacks: dict[int, object] = {}
        self._ids = itertools.count(1)
        self._flush_scheduled = False
        self._ud = np.zeros(512, dtype=np.uint64)
        self._res = np.zeros(512, dtype=np.int32)
        self._stats = ffi.new("uint64_t[2]")
        self.before_harvest = None  # set by the fault engine's owner
        self.after_harvest = None

    # --- lifecycle -------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.eventfd, self.harvest)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.eventfd)
            self._loop = None
        if self._r is not None:
            lib.ufs_ring_free(self._r)
            self._r = None
        if self.eventfd is not None:
            os.close(self.eventfd)
            self.eventfd = None

    def discard(self, addr: int, nbytes: int) -> None:
        """The arena's pages in [addr, addr + nbytes) hold nothing wanted any
        more: back to the kernel (they read as zeros when next touched). A
        registered arena keeps them: they stay pinned whatever we say."""
        lo = self.arena_addr
        if self.registered or not (lo <= addr and addr + nbytes <= lo + len(self.arena)):
            return
        self.arena.madvise(mmap.MADV_DONTNEED, addr - lo, nbytes)

    @property
    def submissions(self) -> int:
        """io_uring_enter calls that submitted something, since the start."""
        lib.ufs_ring_stats(self._r, self._stats, self._stats + 1)
        return self._stats[0]

    @property
    def entries_submitted(self) -> int:
        lib.ufs_ring_stats(self._r, self._stats, self._stats + 1)
        return self._stats[1]

    # --- submission ------------------------------------------------------
    def _queued(self, ret: int, call: str, ud: int) -> int:
        if ret < 0:
            self._callbacks.pop(ud, None)  # refused: it will never complete
            check(ret, call)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        return ret

    def _id(self, callback) -> int:
        ud = next(self._ids)
        self._callbacks[ud] = callback
        return ud

    def flush(self) -> None:
        self._flush_scheduled = False
        if lib.ufs_ring_pending(self._r):
            check(lib.ufs_ring_submit(self._r), "io_uring_submit")

    def read(self, fd: int, addr: int, length: int, offset: int, callback, flags: int = 0) -> int:
        """Queue a read; callback(res) runs on harvest. Returns user_data.
        flags are RWF_* for this read (as preadv2 takes them)."""
        if flags:
            return self._rw_flags(lib.ufs_ring_read_flags, "io_uring read", fd, addr, length,
                                  offset, flags, callback)
        ud = self._id(callback)
        prep = lib.ufs_ring_read_fixed if self._fixed(addr, length) else lib.ufs_ring_read
        self._queued(prep(self._r, fd, ffi.cast("void *", addr), length, offset, ud),
                     "io_uring read", ud)
        return ud

    def write(self, fd: int, addr: int, length: int, offset: int, callback,
              flags: int = 0) -> int:
        if flags:
            return self._rw_flags(lib.ufs_ring_write_flags, "io_uring write", fd, addr, length,
                                  offset, flags, callback)
        ud = self._id(callback)
        prep = lib.ufs_ring_write_fixed if self._fixed(addr, length) else lib.ufs_ring_write
        self._queued(prep(self._r, fd, ffi.cast("void *", addr), length, offset, ud),
                     "io_uring write", ud)
        return ud

    def _fixed(self, addr: int, length: int) -> bool:
        return (self.registered and self.arena_addr <= addr
                and addr + length <= self.arena_addr + len(self.arena))

    def _rw_flags(self, prep, call: str, fd: int, addr: int, length: int, offset: int,
                  flags: int, callback) -> int:
        # the C side picks READ_FIXED/WRITE_FIXED for buffers in the arena
        ud = self._id(callback)
        self._queued(prep(self._r, fd, ffi.cast("void *", addr), length, offset, flags, ud),
                     call, ud)
        return ud

    def readv(self, fd: int, addrs, lengths, offset: int, callback) -> int:
        ud = self._id(callback)
        a, n = _u64(addrs), _u64(lengths)
        self._queued(lib.ufs_ring_readv(self._r, fd, _ptr(a, "uint64_t *"), _ptr(n, "uint64_t *"),
                                        len(a), offset, ud), "io_uring readv", ud)
        return ud

    def writev(self, fd: int, addrs, lengths, offset: int, callback) -> int:
        ud = self._id(callback)
        a, n = _u64(addrs), _u64(lengths)
        self._queued(lib.ufs_ring_writev(self._r, fd, _ptr(a, "uint64_t *"),
                                         _ptr(n, "uint64_t *"), len(a), offset, ud),
                     "io_uring writev", ud)
        return ud

    def cancel(self, target_ud: int) -> None:
        """Cancel a queued operation; its callback still runs, with -ECANCELED."""
        if target_ud in self._callbacks:
            self._queued(lib.ufs_ring_cancel(self._r, target_ud, 0), "io_uring cancel", 0)

    # --- completion ------------------------------------------------------
    def harvest(self) -> int:
        """Run the callbacks of every completion posted so far. Completions
        tagged for the fault engine go to it inside the C harvest; the
        hooks let its owner republish what the engine reads first
        (before_harvest) and take what it produced (after_harvest)."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        if self.before_harvest is not None:
            self.before_harvest()
        done = 0
        while True:
            n = lib.ufs_ring_harvest(self._r, _ptr(self._ud, "uint64_t *"),
                                     _ptr(self._res, "int32_t *"), len(self._ud))
            if n <= 0:
                if self.after_harvest is not None:
                    self.after_harvest()
                if self._loop is not None and lib.ufs_ring_ready(self._r):
                    # the C harvest gave the loop its turn in a storm of
                    # faults it serves itself: come back for the rest
                    self._loop.call_soon(self.harvest)
                return done
            uds, res = self._ud[:n].tolist(), self._res[:n].tolist()
            for ud, r in zip(uds, res):
                cb = self._callbacks.pop(ud, None)
                if cb is not None:
                    try:
                        cb(r)
                    except Exception:  # one broken callback must not lose the others
                        log.exception("io_uring completion callback failed")
            done += n

    # --- awaitable forms for the reclaim path -----------------------------
    def _future(self):
        fut = self._loop.create_future()

        def done(res, fut=fut):
            if not fut.done():
                fut.set_result(res)
        return fut, done

    def read_async(self, fd, addr, length, offset, flags: int = 0):
        fut, cb = self._future()
        self.read(fd, addr, length, offset, cb, flags)
        return fut

    def write_async(self, fd, addr, length, offset, flags: int = 0):
        fut, cb = self._future()
        self.write(fd, addr, length, offset, cb, flags)
        return fut
