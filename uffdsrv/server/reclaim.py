"""Where a page is reclaimed.

A batch goes: write-protect its pages; copy them out with process_vm_readv
(in a worker thread: it can fault, and the loop is who serves faults);
write the pages that are not all zeros to the swap file through the ring
and wait for every write to complete; only then ask the agent to zap what
is still in flight, adjacent pages merged into one range, up to 1024
ranges per process_madvise call. A write fault before the zap is sent
cancels that page; after, it waits until the batch settles.

While the zap request is out, the loop keeps reading the uffd: the agent's
zapping thread blocks on every REMOVE until the server has read it. A ZAP
cannot be taken back once sent: a batch never gives its pages back while
its zap may still run; an answer later than zaps.ZAP_TIMEOUT ends the
request, and the batch settles when it comes (zaps.py). A page counts as
reclaimed only once the zap dropped it. No zap goes out while the server
is stopping, once the agent is gone, or while its last is unanswered.
"""
import asyncio
import errno
import logging
import os
import time

import numpy as np

from .._native import ffi
from ..core import journal, policy, protocol
from ..core.batch import Batch, bridgeable_gaps
from ..core.pages import PAGE, RESIDENT, SWAPPED
from ..core.ranges import byte_ranges, paired_runs, runs
from ..system import proc, uffd
from . import zaps
from .managed import ManagedProcess

log = logging.getLogger("uffdsrv.reclaim")
BATCH_PAGES = 4096
PIPELINE = 2  # batches of one client in flight at once
AGENT_WAIT = 5.0  # seconds a reclaim request waits for a client's agent to come back
MAX_GAP = 64  # absent pages a write-protect or zap range may step over
WP_RETRY_SECONDS = 2.0  # how long a batch retries a write-protect the kernel answers EAGAIN
AGE_AFTER = 8  # halve the pages' heat after reclaiming this many times the managed pages


class NoAgent(Exception):
    pass


class ReclaimPath:
    def __init__(self, loop, ring, swap, journal_file, metrics, buffers, executor,
                 policy_name: str, zap_flags: int, rescan, serve_held):
        """buffers: the staging pool (buffers.Pool) a batch copies out into;
        executor: the threads process_vm_readv runs on; rescan(client):
        manage what the program mapped since; serve_held(client, addrs):
        serve the faults a settled batch held (the fault path)."""
        self.loop = loop
        self.ring = ring
        self.swap = swap
        self.journal = journal_file
        self.metrics = metrics
        self.buffers = buffers
        self.executor = executor
        self.policy = policy_name
        self.zap_flags = zap_flags
        self.rescan = rescan
        self.serve_held = serve_held
        self.full_logged = False
        self.rng = np.random.default_rng()
        self.stopping = False  # set by the server's stop: no batch goes on to its zap

    def _may_go_on(self, client: ManagedProcess) -> bool:
        return not (self.stopping or client.closed or client.agent is None or client.forking)

    async def reclaim(self, client: ManagedProcess, keep_bytes: int = 0) -> int:
        """Reclaim until the client's resident managed memory is at most
        keep_bytes, or nothing more can go. Returns bytes reclaimed (pages
        whose zap dropped them)."""
        if self.stopping or client.forking:  # its pages come back for a fork
            return 0
        if client.agent is None:
            # after a restart the agents come back within a few 100 ms
            try:
                await asyncio.wait_for(client.agent_back.wait(), AGENT_WAIT)
            except TimeoutError:
                raise NoAgent(f"pid {client.pid} has no agent connected to zap its pages") \
                    from None
        if client.recovering:
            # a zap of its own is unanswered: nothing more goes until it is
            return 0
        reclaimed = 0
        async with client.reclaim_lock:
            await self.rescan(client)
            # one pass: a program that keeps faulting pages back in must not
            # keep a reclaim request running for ever
            budget = client.pages.count(RESIDENT)
            # Batches overlap: one copies out while the one before waits
            # on the device or on its zap (a batch's pages are in flight,
            # not resident, so the next one never picks them again).
            running: set[asyncio.Future] = set()
            while self._may_go_on(client) and not client.recovering and budget > 0:
                excess = client.pages.count(RESIDENT) - keep_bytes // PAGE
                if excess <= 0:
                    break
                region, idx = policy.choose(client.pages, min(excess, BATCH_PAGES),
                                            self.policy, self.rng,
                                            client.reclaim_cursor)
                if region is None:
                    break
                budget -= len(idx)
                client.reclaimed_since_aging += len(idx)
                if client.reclaimed_since_aging >= AGE_AFTER * client.pages.managed_pages:
                    client.reclaimed_since_aging = 0
                    policy.age(client.pages)
                client.reclaim_cursor = region.start + (int(idx[-1]) + 1) * PAGE
                # the batch takes its pages now, before the next choice
                b = Batch(region, idx)
                client.batches[b.id] = b
                running.add(asyncio.ensure_future(self.batch(client, region, idx, b)))
                if len(running) < PIPELINE:
                    continue
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                got = sum(t.result() for t in done)  # batch() logs its errors, never raises
                reclaimed += got
                if got == 0 and self.swap.slots.free == 0:
                    break
            if running:
                reclaimed += sum(await asyncio.gather(*running))
        return reclaimed

    async def batch(self, client: ManagedProcess, region, idx: np.ndarray, b: Batch) -> int:
        """Reclaim the pages idx of region, which batch b holds."""
        t0 = time.monotonic()
        pages, slots = client.pages, self.swap.slots
        buf = None
        reclaimed = 0
        zapped = covered = None
        settled = late = False
        try:
            starts, lens = byte_ranges(region.start, idx)
            # protect across gaps of absent pages: one ioctl and one TLB
            # flush per run instead of one per page of a sparse heap
            gaps = bridgeable_gaps(region, idx, MAX_GAP, self._absent(client, region, idx))
            wp = byte_ranges(region.start, np.union1d(idx, gaps)) if len(gaps) else (starts, lens)
            if not await self._protect(client, wp):
                return 0
            buf = await self.buffers.acquire()
            if not self._may_go_on(client):
                return 0
            n = len(idx)
            got = await self.loop.run_in_executor(
                self.executor, proc.vm_readv, client.pid, buf, starts, lens)
            if got != n * PAGE:
                raise OSError(errno.EFAULT, f"process_vm_readv read {got} of {n * PAGE} bytes")
            zero = proc.zero_pages(buf, n)
            live = b.inflight(pages)
            data = live[~zero[live]]
            got_slots = slots.alloc(len(data))
            if len(got_slots) < len(data):
                if not self.full_logged:
                    log.error("swap file %s is full (%d slots): reclaim stops here; "
                              "nothing is lost", self.swap.path, slots.nslots)
                    self.full_logged = True
                self.metrics.error("swap_full")
                b.give_back(pages, data[len(got_slots):])
                data = data[:len(got_slots)]
            else:
                self.full_logged = False
            b.set_slots(pages, data, got_slots)
            await self.write(buf, data, got_slots)
            # The bytes are on the device: the staging buffer is free for
            # other clients' batches while this one waits on its agent (a
            # stopped or frozen program answers its zap only when it runs).
            self.buffers.release(buf)
            buf = None
            live = b.inflight(pages)
            if not len(live) or not self._may_go_on(client) or client.recovering:
                # a stopping server could not wait for the answer, and the
                # agent must never run a zap nobody waits for; one that has
                # not answered the last gets no more
                return 0
            # zap across gaps of absent pages too: one REMOVE round trip per run
            r0, _ = pages.find(int(b.addrs[live[0]]))
            gap_pos = np.zeros(0, dtype=np.int64)
            per_page = self.zap_flags & protocol.ZAP_MADVISE
            if not per_page and r0 is not None and r0.end > int(b.addrs[live[-1]]):
                lidx = (b.addrs[live] - r0.start) // PAGE
                gap_pos = b.add_gaps(r0, bridgeable_gaps(r0, lidx, MAX_GAP,
                                                         self._absent(client, r0, lidx)))
                live = b.inflight(pages)
            zap_pos = np.union1d(live, gap_pos)
            if per_page:
                # the comparison the benchmark makes: one madvise per page
                zstarts = b.addrs[zap_pos].astype(np.uint64)
                zlens = np.full(len(zstarts), PAGE, dtype=np.uint64)
            else:
                zstarts, zlens = self._ranges(b.addrs[zap_pos])
            # the page map is on disk before any page can go
            # (swapped pages the ranges step over too: a restart must know
            # that the REMOVE it may read for them is ours)
            has = b.slots[zap_pos] >= 0
            self.journal.commit(journal.swap_records(client.cid, b.addrs[zap_pos[has]],
                                                     b.slots[zap_pos[has]])
                                + journal.zap_records(client.cid, b.addrs[zap_pos[~has]]))
            zapped, covered = b.addrs[live], b.addrs[zap_pos]
            b.expect_zap(pages, zap_pos)
            t_zap = time.monotonic()
            b.answer = asyncio.gather(*client.agent.zap(zstarts, zlens))
            try:
                results = await asyncio.wait_for(asyncio.shield(b.answer), zaps.ZAP_TIMEOUT)
            except TimeoutError:
                late = True
                zaps.stalled(client, b, self.metrics)
                asyncio.ensure_future(self._late(client, b, live, zstarts, zlens, zapped,
                                                 covered, t0))
                return 0
            zaps.zapped(self.metrics, zstarts, t_zap)
            want = await zaps.removes_read(self.ring, client, b, live, results, zstarts, zlens,
                                           self.metrics)
            settled = want is not None
            if settled:
                reclaimed = zaps.dropped(pages, want) * PAGE
            return reclaimed
        except OSError as e:
            if client.closed or e.errno == errno.ESRCH:
                return 0
            log.warning("reclaim batch of pid %s failed: %s", client.pid, e)
            self.metrics.error("reclaim")
            return 0
        except Exception:  # a bug: this batch ends, the request and the others go on
            log.exception("reclaim batch of pid %s failed", client.pid)
            self.metrics.error("reclaim")
            return 0
        finally:
            if late:
                pass  # _late settles it when the answer comes, or the agent's HELLO does
            elif b.zap_sent and not settled and not client.closed:
                # The agent may still be zapping (its connection broke, or
                # its REMOVEs are late): settling now could hand back pages
                # it is about to drop. Hold the batch until the agent says
                # HELLO again; its zap thread is idle by then.
                log.warning("pid %s: zap not confirmed; holding %d pages until the agent "
                            "is back", client.pid, len(b))
                client.recovering.append(b)
            else:
                self.settle(client, b, zapped, covered)
            if buf is not None:
                self.buffers.release(buf)
            if reclaimed:
                self.metrics.reclaimed(reclaimed // PAGE, time.monotonic() - t0)

    async def _protect(self, client: ManagedProcess, ranges) -> bool:
        """Write-protect the batch. EAGAIN means the mm is changing (an
        event of the program's is unread): read the events, let the
        program's thread run, and try again, as the fault path does; a busy
        program (malloc and free all the time) would otherwise never be
        reclaimed."""
        deadline = time.monotonic() + WP_RETRY_SECONDS
        while True:
            try:
                uffd.writeprotect(client.uffd, *ranges, True)
                return True
            except OSError as e:
                if e.errno == errno.EAGAIN and time.monotonic() < deadline \
                        and not client.closed:
                    self.ring.harvest()
                    await asyncio.sleep(0)
                    continue
                if e.errno not in (errno.ESRCH, errno.ENOENT):
                    log.warning("write-protect for pid %s: %s", client.pid, e)
                    self.metrics.error("writeprotect")
                return False

    async def _late(self, client: ManagedProcess, b: Batch, live, zstarts, zlens, zapped,
                    covered, t0: float) -> None:
        """The rest of a batch whose answer was late: settle it when the
        agent answers. If the agent goes away instead, the batch stays in
        `recovering` until its HELLO (the zap may run before that)."""
        try:
            results = await b.answer
        except Exception:
            return
        if client.closed or b not in client.recovering:
            return
        zaps.zapped(self.metrics, zstarts, t0)
        want = await zaps.removes_read(self.ring, client, b, live, results, zstarts, zlens,
                                       self.metrics)
        if want is None or client.closed or b not in client.recovering:
            return
        n = zaps.dropped(client.pages, want)
        client.recovering.remove(b)
        self.settle(client, b, zapped, covered)
        log.info("pid %s answered its zap after %.1f s; %d pages reclaimed", client.pid,
                 time.monotonic() - t0, n)
        if n:
            self.metrics.reclaimed(n, time.monotonic() - t0)

    def settle(self, client: ManagedProcess, b: Batch, zapped, covered) -> None:
        """The batch is over: journal what did not end swapped, mark its
        zap settled, hand pages back, and serve the faults it held. Once:
        a batch already settled is only forgotten."""
        if b.settled:
            client.batches.pop(b.id, None)
            return
        pages, slots = client.pages, self.swap.slots
        if zapped is not None:
            self._journal_unswapped(client, zapped)
            self.journal.extend(journal.settled_records(client.cid, covered))
            self.journal.flush()
        unprotect = b.settle(pages, slots)
        if len(unprotect) and not client.closed:
            us, ul = self._ranges(unprotect)
            try:
                uffd.writeprotect(client.uffd, us, ul, False)
            except OSError as e:
                log.debug("unprotect for pid %s: %s", client.pid, e)
        if b.held and not client.closed:
            self.serve_held(client, np.unique(np.array(b.held, dtype=np.int64)))
        client.batches.pop(b.id, None)

    @staticmethod
    def _absent(client: ManagedProcess, region, idx: np.ndarray) -> np.ndarray | None:
        """Which pages from idx[0] to idx[-1] are absent in the process
        (pagemap), or None if that cannot be read."""
        if len(idx) < 2:
            return None
        lo = int(idx[0])
        try:
            return ~proc.pagemap_present(client.pid, region.start + lo * PAGE,
                                         int(idx[-1]) + 1 - lo)
        except OSError:
            return None

    def _journal_unswapped(self, client: ManagedProcess, addrs: np.ndarray) -> None:
        """Pages of the zap that did not end up swapped hold no slot any
        more: say so before their SWAP record could mislead a restart."""
        back = addrs[client.pages.states_at(addrs) != SWAPPED]
        if len(back):
            self.journal.extend(journal.free_records(client.cid, back))
            self.journal.flush()

    async def write(self, buf: int, positions: np.ndarray, slots: np.ndarray) -> None:
        """One ring write per run of pages that are adjacent both in the
        buffer and in the swap file; returns when all have completed (and,
        in the swap file's buffered mode, are on the device and out of the
        page cache)."""
        if not len(positions):
            return
        first, count = paired_runs(positions, slots)
        ring, swap = self.ring, self.swap
        if swap.tier is not None:  # what the pool has of these slots is older than the write
            swap.tier.drop(slots)
        futs = [ring.write_async(swap.fd, buf + int(positions[f]) * PAGE, int(c) * PAGE,
                                 int(slots[f]) * PAGE, swap.rw_flags)
                for f, c in zip(first.tolist(), count.tolist())]
        results = await asyncio.gather(*futs)
        for res, f, c in zip(results, first.tolist(), count.tolist()):
            if res != c * PAGE:
                self.metrics.error("swap_write")
                if res >= 0:
                    # a short write: the run, written again whole (direct
                    # I/O takes whole slots only), says why
                    try:
                        run = ffi.buffer(ffi.cast("char *", buf + int(positions[f]) * PAGE),
                                         c * PAGE)
                        res = -errno.EIO
                        if swap.pwrite(run, int(slots[f]) * PAGE) == c * PAGE:
                            continue
                    except OSError as e:
                        res = -(e.errno or errno.EIO)
                raise OSError(-res, f"swap write to {swap.path}: {os.strerror(-res)}")
        offsets = (slots[first] * PAGE).tolist()
        lengths = (count * PAGE).tolist()

        def written():
            for off, n in zip(offsets, lengths):
                swap.written(off, n)
        if swap.needs_sync:  # waits for the device: not on the loop
            await self.loop.run_in_executor(self.executor, written)
        else:
            written()
        self.metrics.swap_written(int(count.sum()) * PAGE)
        # On the device now: the pool is only a faster copy, compressed in a
        # worker (~25 ms a batch) so that faults are not served behind it
        if swap.tier is not None:
            await swap.tier.store_off_loop(self.executor, buf, positions, slots)

    @staticmethod
    def _ranges(addrs: np.ndarray):
        base = int(addrs[0]) if len(addrs) else 0
        first, count = runs((np.asarray(addrs, dtype=np.int64) - base) // PAGE)
        return ((base + first * PAGE).astype(np.uint64), (count * PAGE).astype(np.uint64))
