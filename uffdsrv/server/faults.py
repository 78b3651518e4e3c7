"""Where a fault is served.

The ring keeps one read outstanding on every client's uffd; each
completion is a batch of uffd_msgs, handed whole to the native fault
engine (system/engine.py): zero pages, write-protect releases and swap-ins
with readahead are served in C, and the swap reads complete in C too.
A batch that holds events (REMOVE, UNMAP, REMAP, FORK) comes back
untouched: the events are applied to the page map here first, in order,
then its faults are served. What the engine hands back is served here:
faults a reclaim batch holds, the beacon, pages in flight, and every
address an ioctl refused with EAGAIN.

EAGAIN from UFFDIO_COPY/ZEROPAGE/WRITEPROTECT means an event is unread:
the fault is retried on the next turn of the loop, after the ring has
delivered the event; never slept on. Metrics and the journal's flush are
settled every TICK seconds, not per fault (FREE records join the
journal's queue at once, in order; one lost in a crash is found again at
takeover: the page is present).
"""
import asyncio
import collections
import errno
import logging
import os
import time

import numpy as np

from .._native import ffi
from ..core import journal
from ..core.batch import cancel_page
from ..core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED
from ..core.policy import now_ms
from ..core.swapin import MAX_READAHEAD, loading_in, written, zeroed
from ..system import engine as eng
from ..system import uffd
from .managed import ManagedProcess
from .read_errors import SWAP_READ_TRIES, ReadErrors, restore_gaps

log = logging.getLogger("uffdsrv.faults")
# After queueing a swap read, spin on the ring for up to this many µs
# (UFFDSRV_POLL_US; 0 turns it off) instead of sleeping in epoll until its
# completion wakes the loop: on this 2-CPU VM the wake-up costs more than
# the read. Random fault-in, 1 thread, against the C reference in one run:
# 0 µs 0.5-0.6x its pages/s (p50 128-140 µs), 30 µs 1.2-1.4x (p50 61 µs),
# 80 µs 1.6-1.7x (p50 52 µs, p99 110-151 µs against its 315-361 µs). Only
# after a read of at most 4 pages: spinning on readahead reads (longer)
# halved sequential fault-in with 4 threads.
POLL_US = int(os.environ.get("UFFDSRV_POLL_US", "80") or 0)
TICK = 0.01
__all__ = ["FaultPath", "MAX_READAHEAD", "SWAP_READ_TRIES", "now_ms"]

# engine counters that are metrics of the same name
_FAULT_KINDS = ("zero", "write_protect", "swap", "loading", "unknown")
_ERROR_KINDS = ("eagain", "copy", "zeropage", "swap_read", "unprotect")


class FaultPath:
    def __init__(self, loop, ring, swap, journal_file, metrics, buffers: tuple[int, int],
                 on_fork, on_beacon):
        """buffers: (address, bytes) of the ring arena's part the engine
        reads swap slots into; on_fork(parent, uffd): a FORK event;
        on_beacon(client, tid): a forked child touched its beacon page."""
        self.loop, self.ring, self.swap = loop, ring, swap
        self.journal, self.metrics = journal_file, metrics
        self.on_fork, self.on_beacon = on_fork, on_beacon
        self.engine = eng.Engine(ring, *buffers)
        self.engine.set_poll(POLL_US)
        self.nloads = buffers[1] // (MAX_READAHEAD * PAGE)
        self._slots = None
        self._clients: dict[int, ManagedProcess] = {}  # engine handle id -> client
        self._tick_scheduled = False
        self._queue: collections.deque = collections.deque()
        self._handling = False
        self.read_errors = ReadErrors(loop, metrics, self.retry)  # read_errors.py
        ring.before_harvest = self._refresh_all
        ring.after_harvest = self._after

    # --- reading the uffd ----------------------------------------------------
    def start(self, client: ManagedProcess) -> None:
        """Read the client's uffd: the engine keeps one read outstanding and
        serves what it reads."""
        if client.engine is None:
            client.engine = h = self.engine.client(client.uffd)
            client.read_buf = h.read_buf
            self._clients[h.id] = client
        if not client.closed:
            self._fresh(client, client.engine)
            client.engine.arm()
            self.ring.flush()

    def stop(self, client: ManagedProcess) -> None:
        h = client.engine
        if h is not None:
            self._settle_counters(client, h)
            self.engine.forget(h)
            self._clients.pop(h.id, None)
            client.engine = None

    def _event_read(self, client: ManagedProcess, addr: int, nbytes: int) -> None:
        """A read that holds events: apply them first, in order, then serve
        its faults; the next read of the uffd goes out with them."""
        t = time.monotonic_ns()
        h = client.engine
        buf = ffi.cast("char *", addr)
        self._events(client, uffd.parse(ffi.buffer(buf, nbytes), nbytes).copy())
        if client.closed or client.engine is not h:
            return
        self._fresh(client, h)
        h.arm()  # into the other half: this one is served now
        self._settle(h.serve(buf, nbytes, t, eng.SKIP_EVENTS))

    def _events(self, client: ManagedProcess, msgs: np.ndarray) -> None:
        ev = msgs["event"]
        self.metrics.events(ev[ev != uffd.EVENT_PAGEFAULT])  # the engine counts faults
        pages, slots, jr = client.pages, self.swap.slots, self.journal
        for m in msgs[ev != uffd.EVENT_PAGEFAULT]:
            e, a0, a1, a2 = int(m["event"]), int(m["a0"]), int(m["a1"]), int(m["a2"])
            if e == uffd.EVENT_REMOVE:
                for addr, n in pages.remove(a0, a1, slots):
                    jr.add(journal.FREE, client.cid, addr, n)
            elif e == uffd.EVENT_UNMAP:
                pages.drop(a0, a1, slots)
                jr.add(journal.UNMAP, client.cid, a0, a1)
            elif e == uffd.EVENT_REMAP:
                pages.remap(a0, a1, a2, slots)
                jr.add(journal.REMAP, client.cid, a0, a1, a2)
            elif e == uffd.EVENT_FORK:
                self.on_fork(client, a0 & 0xFFFFFFFF)
        jr.flush()

    # --- the engine's view of the page map ------------------------------------
    def _fresh(self, client: ManagedProcess, h) -> None:
        slots = self.swap.slots
        if slots is not self._slots:  # replaced after a journal replay
            self.engine.set_swap(self.swap.fd, slots, self.swap.rw_flags, self.swap.drops_reads)
            self._slots = slots
        if h.stale(client.pages, client.cid, client.beacon):
            h.publish(client.pages, client.cid, client.beacon)

    def _refresh_all(self) -> None:
        # The engine serves the reads it harvests and looks completions up
        # in the current table: republish what changed (a munmap, a region
        # added) since it last ran.
        for c in self._clients.values():
            h = c.engine
            if h is not None and not c.closed:
                self._fresh(c, h)

    # --- what the engine hands back ------------------------------------------------
    def _after(self) -> None:
        self._settle(self.engine.pending())

    def _settle(self, p: int) -> None:
        if p & (eng.OUT | eng.JOURNAL):
            outs, records = self.engine.take()
            if records:
                self.journal.extend([records])
                p |= eng.DIRTY  # flushed on this turn's tick
            if outs is not None:
                # handling may serve again and hand back more: in order, and
                # in this loop, never by recursion (a storm of events would
                # go as deep as it is long)
                self._queue.append(outs)
                if not self._handling:
                    self._handling = True
                    try:
                        while self._queue:
                            self._handle(self._queue.popleft())
                    finally:
                        self._handling = False
        if p & eng.DIRTY and not self._tick_scheduled:
            self._tick_scheduled = True
            self.loop.call_later(TICK, self._tick)

    def _handle(self, outs: np.ndarray) -> None:
        zero: dict[int, list] = {}
        unprotect: dict[int, list] = {}
        for o in outs.tolist():
            addr, flags, tid, hid, kind, err = o
            client = self._clients.get(hid)
            if client is None or client.closed:
                continue
            if kind == eng.HAND:
                self._by_python(client, addr, flags, tid, zero.setdefault(hid, []),
                                unprotect.setdefault(hid, []))
            elif kind == eng.RETRY:
                self.retry(client, addr, flags, tid)
            elif kind == eng.FAILED:
                self.read_errors.failed(client, addr, int(flags), err, tid)
            elif kind == eng.ERROR:
                log.warning("%s at %#x of pid %s: %s", eng.OPS.get(flags, "ioctl"), addr,
                            client.pid, errno.errorcode.get(-err, err))
            elif kind == eng.READ:
                self.swap.was_read(addr, int(flags))
            elif kind == eng.EVENT_READ:
                self._event_read(client, addr, int(flags))
            elif kind == eng.UFFD_ERROR:
                # e.g. EMFILE installing a forked child's uffd: the kernel
                # keeps the event; stopping here would leave every fault waiting
                log.error("read of uffd of pid %s failed: %s; trying again", client.pid,
                          errno.errorcode.get(-err, err))
                self.metrics.error("uffd_read")
                self.read_errors.later(0.05, self.start, client, retry=False)
        for hid, addrs in unprotect.items():
            if addrs:
                self._unprotect(self._clients[hid], addrs)
        for hid, addrs in zero.items():
            if addrs:
                self._zero_fill(self._clients[hid], addrs)

    def _by_python(self, client: ManagedProcess, addr: int, fl: int, tid: int, zero: list,
                   unprotect: list) -> None:
        """A fault the engine leaves to Python: the beacon, a page a reclaim
        batch holds, a page in flight, or a write to a page not resident."""
        if addr == client.beacon:
            self.on_beacon(client, tid)
            zero.append(addr)
            return
        r, i = client.pages.find(addr)
        if r is None:
            zero.append(addr)
            self.metrics.fault("unknown")
            return
        st, b = int(r.state[i]), int(r.batch[i])
        wp = bool(fl & uffd.PAGEFAULT_FLAG_WP)
        if b:
            batch = client.batches.get(b)
            # Our zap of this page is on its way (whatever the program does
            # to it now could be lost), or it is a swapped page the batch
            # took in before its zap: wait for the batch to settle.
            if batch is not None and (batch.zap_sent or (st == SWAPPED and not wp)):
                batch.held.append(addr)
                self.metrics.fault("held")
                return
        if wp:
            # a write to a page in flight before its zap was sent: it stays
            if st == INFLIGHT:
                cancel_page(r, i)
            if st in (INFLIGHT, RESIDENT, EMPTY):
                written(r, i, now_ms())
            unprotect.append(addr)
            self.metrics.fault("write_protect")
        elif st == SWAPPED:
            # held by a batch that is gone: served once the map says more
            self.loop.call_later(0.01, self.retry, client, addr, fl, tid)
        elif st == LOADING:
            self.metrics.fault("loading")
        else:
            if st == INFLIGHT:
                cancel_page(r, i)
            zero.append(addr)
            self.metrics.fault("zero")

    def _unprotect(self, client: ManagedProcess, addrs: list) -> None:
        u = np.array(addrs, dtype=np.uint64)
        try:
            uffd.writeprotect(client.uffd, u, np.full(len(u), PAGE, np.uint64), False)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                for addr in addrs:
                    self.retry(client, addr, uffd.PAGEFAULT_FLAG_WP)
            elif e.errno not in (errno.ESRCH, errno.ENOENT):
                self.metrics.error("unprotect")
                log.warning("unprotect for pid %s: %s", client.pid, e)

    def _zero_fill(self, client: ManagedProcess, addrs: list) -> None:
        a = np.unique(np.array(addrs, dtype=np.int64))
        n, res = uffd.zeropage(client.uffd, a, np.full(len(a), PAGE, np.uint64))
        for addr, r_ in zip(a[:n].tolist(), res[:n].tolist()):
            if r_ > 0 or r_ == -errno.EEXIST:
                reg, i = client.pages.find(addr)
                if reg is not None:
                    zeroed(reg, i, now_ms())
            elif r_ == -errno.EAGAIN:
                self.retry(client, addr)
            elif r_ not in (-errno.ENOENT, -errno.ESRCH):
                self.metrics.error("zeropage")
                log.warning("UFFDIO_ZEROPAGE at %#x of pid %s: %s", addr, client.pid,
                            errno.errorcode.get(-r_))
        for addr in a[n:].tolist():
            self.retry(client, addr)

    def _tick(self) -> None:
        self._tick_scheduled = False
        self.journal.flush()
        m = self.metrics
        for kind, n, secs in self.engine.samples():
            m.fault_served(kind, n, secs)
        for c in list(self._clients.values()):
            self._settle_counters(c, c.engine)

    def _settle_counters(self, client: ManagedProcess, h) -> None:
        m, d = self.metrics, h.delta()
        for kind, n in d.items():
            if kind in _FAULT_KINDS:
                m.fault(kind, n)
            elif kind in _ERROR_KINDS:
                m.errors_total.labels(kind).inc(n)
        if d:
            if d.get("faults"):
                m.events(np.full(d["faults"], uffd.EVENT_PAGEFAULT, dtype=np.uint8))
                client.faults_total += d["faults"]
            m.swapped_in(d.get("swapped_in", 0))
            m.swap_read(d.get("read_bytes", 0))
            client.refaults += d.get("refaults", 0)
            client.readahead_pages += d.get("readahead", 0)
            client.readahead_misses += d.get("readahead_misses", 0)

    # --- serving addresses (held faults, retries) ---------------------------------------
    def serve(self, client: ManagedProcess, addrs, flags, tids) -> None:
        """Serve faults read earlier (held by a batch, or refused with
        EAGAIN) through the engine like any read."""
        h = client.engine
        if client.closed or h is None or not len(addrs):
            return
        msgs = np.zeros(len(addrs), dtype=uffd.MSG_DTYPE)
        msgs["event"] = uffd.EVENT_PAGEFAULT
        msgs["a0"] = np.asarray(flags, dtype=np.int64).astype(np.uint64)
        msgs["a1"] = np.asarray(addrs, dtype=np.int64).astype(np.uint64)
        msgs["a2"] = np.asarray(tids, dtype=np.int64).astype(np.uint64)
        self._fresh(client, h)
        self._settle(h.serve(ffi.from_buffer(msgs), msgs.nbytes, time.monotonic_ns(),
                             eng.SKIP_EVENTS | eng.NOT_READ))

    def retry(self, client: ManagedProcess, addr: int, flags: int = 0, tid: int = 0) -> None:
        client.retry.append((addr, flags, tid))
        if not client.retry_scheduled:
            client.retry_scheduled = True
            self.loop.call_soon(self._retry, client)

    def _retry(self, client: ManagedProcess) -> None:
        client.retry_scheduled = False
        if client.closed:
            return
        self.ring.harvest()  # the pending event is usually there by now
        todo, client.retry = np.array(client.retry, dtype=np.int64), []
        if len(todo):
            self.serve(client, todo[:, 0], todo[:, 1], todo[:, 2])

    def close(self) -> None:
        """Before the swap file closes: no retry may read it after (its fd
        number goes to the next file opened), and no client is served."""
        self.read_errors.close()
        for c in list(self._clients.values()):
            self.stop(c)

    # --- putting pages back --------------------------------------------------------------
    async def restore(self, client: ManagedProcess, start: int = 0, end: int = 1 << 64) -> int:
        """Put every reclaimed page of the client in [start, end) back, through
        the engine (the same reads and COPYs as a fault, with no readahead
        window and no heat). A page whose read fails is not loaded again in
        this call: it stays swapped (read_errors.py). -> pages put back."""
        h = client.engine
        if h is None:
            return 0
        first = int(h.counters[eng.C["restored"]])
        failed = self.read_errors.begin_pass(client)
        try:
            for _ in range(1_000_000):
                if client.closed or client.engine is not h:
                    break
                self._fresh(client, h)
                queued = q = 0
                for lo, hi in restore_gaps(client, start, end, failed):
                    if queued and self.engine.busy >= self.nloads * 3 // 4:
                        break  # the rest of the buffers are for faults
                    q = h.restore(lo, hi, max(1, self.nloads * 3 // 4))
                    if q < 0:
                        break
                    queued += q
                self._after()
                if q < 0:
                    break
                if not queued and not client.retry and not loading_in(client.pages, start, end):
                    break
                await asyncio.sleep(0)
                self.ring.harvest()
        finally:
            self.read_errors.end_pass(client)
        self.journal.flush()
        return int(h.counters[eng.C["restored"]]) - first
