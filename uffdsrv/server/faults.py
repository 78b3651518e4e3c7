"""Where a fault is served.

The ring keeps one read outstanding on every client's uffd; each
completion is a batch of uffd_msgs. Events (REMOVE, UNMAP, REMAP, FORK) are
applied to the page map first, then the faults of the batch are sorted
into zero-page fills, swap-ins, write-protect releases, and faults held
until a reclaim batch settles. The ioctls of a batch run in one C call.

EAGAIN from UFFDIO_COPY/ZEROPAGE means an event is still unread: the fault
goes on the client's retry list and is tried again on the next turn of the
loop, after the ring has delivered the event. Never sleep on it.
"""
import errno
import logging
import time

import numpy as np

from .._native import ffi
from ..core import journal
from ..core.batch import cancel_page
from ..core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED
from ..system import uffd
from .managed import ManagedProcess

log = logging.getLogger("uffdsrv.faults")
READ_MSGS = 64
MAX_READAHEAD = 32
PAGE_MASK = ~(PAGE - 1)


class FaultPath:
    def __init__(self, server):
        self.server = server
        self.ring = server.ring
        self.swap = server.swap
        self.metrics = server.metrics
        self.t_read = time.monotonic()  # when the batch being handled was read

    # --- reading the uffd ----------------------------------------------------
    def start(self, client: ManagedProcess) -> None:
        if client.read_buf is None:
            client.read_buf = ffi.new("char[]", READ_MSGS * uffd.MSG_SIZE)
        addr = int(ffi.cast("uintptr_t", client.read_buf))
        client.read_ud = self.ring.read(client.uffd, addr, READ_MSGS * uffd.MSG_SIZE, 0,
                                        lambda res, c=client: self._on_read(c, res))

    def stop(self, client: ManagedProcess) -> None:
        if client.read_ud is not None:
            self.ring.cancel(client.read_ud)
            client.read_ud = None

    def _on_read(self, client: ManagedProcess, res: int) -> None:
        client.read_ud = None
        if client.closed or res == -errno.ECANCELED:
            return
        if res < 0:
            if res in (-errno.EAGAIN, -errno.EINTR):
                self.start(client)
                return
            # e.g. EMFILE installing a forked child's uffd: the kernel keeps
            # the event; stopping here would leave every fault waiting
            log.error("read of uffd of pid %s failed: %s; trying again", client.pid,
                      errno.errorcode.get(-res))
            self.metrics.error("uffd_read")
            self.server.loop.call_later(0.05, self.start, client)
            return
        msgs = uffd.parse(ffi.buffer(client.read_buf, res), res).copy()
        # The next read goes out after this batch is handled, so a harvest
        # run from inside the handling can never deliver this client's
        # later events before the earlier ones are done.
        try:
            self.handle(client, msgs)
        finally:
            if not client.closed:
                self.start(client)

    # --- events and faults -----------------------------------------------------
    def handle(self, client: ManagedProcess, msgs: np.ndarray) -> None:
        ev = msgs["event"]
        self.metrics.events(ev)
        self.t_read = time.monotonic()
        pages, slots, jr = client.pages, self.swap.slots, self.server.journal
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
                self.server.forked(client, a0 & 0xFFFFFFFF)
        jr.flush()
        faults = msgs[ev == uffd.EVENT_PAGEFAULT]
        if len(faults):
            client.faults_total += len(faults)
            self.serve(client, faults["a1"].astype(np.int64) & PAGE_MASK,
                       faults["a0"].astype(np.int64), (faults["a2"] & 0xFFFFFFFF).astype(np.int64))

    def serve(self, client: ManagedProcess, addrs, flags, tids) -> None:
        pages = client.pages
        zero, unprotect = [], []
        swapping = False
        for addr, fl, tid in zip(addrs.tolist(), flags.tolist(), tids.tolist()):
            if addr == client.beacon:
                self.server.beacon(client, tid)
                zero.append(addr)
                continue
            r, i = pages.find(addr)
            if r is None:
                # Not ours (or not yet: a REMAP may be unread, and then the
                # fill fails with EAGAIN and is retried after the event).
                zero.append(addr)
                self.metrics.fault("unknown")
                continue
            b = int(r.batch[i])
            if b:
                batch = client.batches.get(b)
                if batch is not None and batch.zap_sent:
                    # Our zap of this page is on its way: whatever the
                    # program does to it now could be lost. Wait for it.
                    batch.held.append(addr)
                    self.metrics.fault("held")
                    continue
            st = int(r.state[i])
            if fl & uffd.PAGEFAULT_FLAG_WP:
                # a write to a page in flight before its zap was sent: it
                # stays; to a resident page the write tracker protected:
                # it is being written, so it is warm
                if st == INFLIGHT:
                    cancel_page(r, i)
                if st == EMPTY:  # MADV_FREE'd, kept by the kernel, written again
                    r.state[i] = RESIDENT
                if st in (INFLIGHT, RESIDENT, EMPTY):
                    warm(r, i)
                unprotect.append(addr)
                self.metrics.fault("write_protect")
            elif st == SWAPPED:
                self.swap_in(client, r, i, addr, tid)
                swapping = True
            elif st == LOADING:
                self.metrics.fault("loading")  # the COPY on its way wakes this one too
            else:
                if st == INFLIGHT:
                    cancel_page(r, i)
                zero.append(addr)
                self.metrics.fault("zero")
        if unprotect:
            u = np.array(unprotect, dtype=np.uint64)
            try:
                uffd.writeprotect(client.uffd, u, np.full(len(u), PAGE, np.uint64), False)
                self.metrics.fault_served("write_protect", len(u), time.monotonic() - self.t_read)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    # an event is unread (the mm is changing): the writers
                    # wait until the protection is lifted, so lift it later
                    for addr in unprotect:
                        self.retry(client, addr, uffd.PAGEFAULT_FLAG_WP)
                else:
                    self._gone_or_log(client, e, "unprotect")
        if zero:
            self.zero_fill(client, np.array(zero, dtype=np.int64))
        if swapping:
            # Reads that hit the page cache complete inside the submit:
            # finish them now instead of on the next turn of the loop.
            self.ring.flush()
            self.ring.harvest()

    def zero_fill(self, client: ManagedProcess, addrs: np.ndarray) -> None:
        addrs = np.unique(addrs)
        n, res = uffd.zeropage(client.uffd, addrs, np.full(len(addrs), PAGE, np.uint64))
        self.metrics.fault_served("zero", n, time.monotonic() - self.t_read)
        pages = client.pages
        for addr, r_ in zip(addrs[:n].tolist(), res[:n].tolist()):
            if r_ > 0 or r_ == -errno.EEXIST:
                reg, i = pages.find(addr)
                if reg is not None and reg.state[i] == EMPTY:
                    reg.state[i] = RESIDENT
                    reg.stamp[i] = now_ms()
            elif r_ == -errno.EAGAIN:
                self.retry(client, addr)
            elif r_ not in (-errno.ENOENT, -errno.ESRCH):
                self.metrics.error("zeropage")
                log.warning("UFFDIO_ZEROPAGE at %#x of pid %s: %s", addr, client.pid,
                            errno.errorcode.get(-r_))
        for addr in addrs[n:].tolist():
            self.retry(client, addr)

    # --- retry after EAGAIN -------------------------------------------------------
    def retry(self, client: ManagedProcess, addr: int, flags: int = 0) -> None:
        client.retry.append((addr, flags))
        if not client.retry_scheduled:
            client.retry_scheduled = True
            self.server.loop.call_soon(self._retry, client)
            self.metrics.error("eagain")

    def _retry(self, client: ManagedProcess) -> None:
        client.retry_scheduled = False
        if client.closed:
            return
        self.ring.harvest()  # the pending event is usually there by now
        todo, client.retry = client.retry, []
        if todo:
            a = np.array(todo, dtype=np.int64)
            self.serve(client, a[:, 0], a[:, 1], np.zeros(len(a), np.int64))

    # --- swap-in ------------------------------------------------------------------
    def swap_in(self, client: ManagedProcess, r, i: int, addr: int, tid: int = 0) -> None:
        """Read the page's slot and put it back with one COPY; when this
        thread's faults run sequentially, bring the pages reclaimed next to
        it along (the window doubles on each sequential fault, up to
        MAX_READAHEAD, and falls back to one page on a jump)."""
        window = client.readahead.get(tid)
        if window is not None and window[0] == addr:
            size = min(window[1] * 2, MAX_READAHEAD)
        else:
            size = 1
        slot0 = int(r.slot[i])
        k = 1
        while (k < size and i + k < r.npages and r.state[i + k] == SWAPPED
               and r.batch[i + k] == 0 and r.slot[i + k] == slot0 + k):
            k += 1
        if len(client.readahead) > 4096:
            client.readahead.clear()  # threads come and go; keep this bounded
        client.readahead[tid] = (addr + k * PAGE, size)
        buf = self.server.fault_pool.try_acquire()
        if buf is None:
            self.retry(client, addr)  # every buffer busy: try on the next turn
            return
        r.state[i:i + k] = LOADING
        slots = r.slot[i:i + k].copy()
        self.swap.slots.ref(slots)  # pinned while the read is in flight
        self.metrics.fault("swap")
        self.metrics.swap_started(buf, self.t_read)
        self.ring.read(self.swap.fd, buf, k * PAGE, slot0 * PAGE,
                       lambda res: self._loaded(client, r.start + i * PAGE, slots, buf, res))

    def _loaded(self, client: ManagedProcess, start: int, slots, buf: int, res: int) -> None:
        k = len(slots)
        try:
            if client.closed:
                return
            if res != k * PAGE:
                self.metrics.error("swap_read")
                log.error("swap read of %d pages at slot %d: %s", k, slots[0],
                          errno.errorcode.get(-res, res))
                self._unload(client, start, slots)
                self.server.loop.call_later(0.1, self._refault, client, start, k)
                return
            self.server.metrics.swap_read(k * PAGE)
            self._copy(client, start, slots, buf)
            self.server.journal.flush()  # the FREE of what came back, now
            self.metrics.swap_done(buf, time.monotonic())
        finally:
            self.swap.slots.release(slots)
            self.server.fault_pool.release(buf)

    def _unload(self, client, start, slots):
        r, i = client.pages.find(start)
        if r is not None:
            k = min(len(slots), r.npages - i)
            back = (r.state[i:i + k] == LOADING) & (r.slot[i:i + k] == slots[:k])
            r.state[i:i + k][back] = SWAPPED

    def _copy(self, client: ManagedProcess, start: int, slots, buf: int) -> None:
        r, i = client.pages.find(start)
        k = len(slots)
        if r is None or i + k > r.npages:
            ok = np.zeros(k, dtype=bool)
        else:
            ok = (r.state[i:i + k] == LOADING) & (r.slot[i:i + k] == slots)
        if not ok.all():
            # Something happened meanwhile (the program removed a page, it
            # was unmapped): copy the pages still wanted, serve the rest anew.
            for j in np.flatnonzero(~ok).tolist():
                self.retry(client, start + j * PAGE)
        if k == 1 and ok[0]:
            n, res = uffd.copy(client.uffd, (start,), (buf,), (PAGE,))
            got = int(res[0]) if n else -errno.EAGAIN
            if got == PAGE or got == -errno.EEXIST:
                self.server.journal.add(journal.FREE, client.cid, start, 1)
                self.swap.slots.release(int(r.slot[i]))
                r.slot[i] = -1
                r.state[i] = RESIDENT
                warm(r, i)
                client.refaults += 1
                self.metrics.swapped_in(1)
                return
        pos = np.flatnonzero(ok)
        if not len(pos):
            return
        # one COPY per run of pages still loading
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        firsts = pos[np.concatenate(([0], breaks))]
        lens = np.diff(np.concatenate(([0], breaks, [len(pos)])))
        n, res = uffd.copy(client.uffd, start + firsts * PAGE, buf + firsts * PAGE, lens * PAGE)
        for f, ln, got in zip(firsts[:n].tolist(), lens[:n].tolist(), res[:n].tolist()):
            # EEXIST: the first page is already there (not the whole run)
            done = 1 if got == -errno.EEXIST else max(got, 0) // PAGE
            if done:
                idx = slice(i + f, i + f + done)
                self.server.journal.add(journal.FREE, client.cid, start + f * PAGE, done)
                self.swap.slots.release(r.slot[idx])
                r.slot[idx] = -1
                r.state[idx] = RESIDENT
                r.stamp[idx] = now_ms()
                if f == 0:  # the faulting page; the rest came along
                    warm(r, i)
                    client.refaults += 1
                    client.readahead_pages += done - 1
                else:
                    client.readahead_pages += done
                # pages read ahead are the stream's next ones: as hot as the
                # page that brought them, or the policy would evict them first
                r.heat[idx] = r.heat[i]
                self.metrics.swapped_in(done)
            if done < ln:
                if got < 0 and got not in (-errno.EAGAIN, -errno.ENOENT, -errno.ESRCH):
                    self.metrics.error("copy")
                    log.warning("UFFDIO_COPY at %#x of pid %s: %s", start + f * PAGE,
                                client.pid, errno.errorcode.get(-got))
                r.state[i + f + done:i + f + ln] = SWAPPED
                if got != -errno.ESRCH:
                    self._refault(client, start + (f + done) * PAGE, ln - done)
        for f, ln in zip(firsts[n:].tolist(), lens[n:].tolist()):
            r.state[i + f:i + f + ln] = SWAPPED
            self._refault(client, start + f * PAGE, ln)

    def _refault(self, client: ManagedProcess, start: int, npages: int) -> None:
        """Pages of a swap-in that were not put back: other threads may wait
        on any of them (their faults were read and left to this COPY). Wake
        them all so they fault again, and serve the first one now."""
        try:
            uffd.wake(client.uffd, [start], [npages * PAGE])
        except OSError:
            pass
        self.retry(client, start)

    def _gone_or_log(self, client: ManagedProcess, e: OSError, what: str) -> None:
        if e.errno in (errno.ESRCH, errno.ENOENT):
            return
        self.metrics.error(what)
        log.warning("%s for pid %s: %s", what, client.pid, e)


def now_ms() -> int:
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


def warm(r, i: int) -> None:
    """The page came back soon after it was taken: it is hot."""
    if r.heat[i] < 255:
        r.heat[i] += 1
    r.stamp[i] = now_ms()

