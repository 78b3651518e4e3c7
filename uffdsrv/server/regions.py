"""Which memory of a process is managed.

A program started with `uffdsrv run` has its private anonymous mappings
managed as they appear (its /proc/PID/maps is read at HELLO, before each
reclaim and every second); a program using the explicit API names its
ranges itself. Either way: register first, then read which pages are
present (pagemap), so that no page can become present unseen in between;
a page never present is a zero page.

Locked memory (mlock, mlockall, MAP_LOCKED: `lo` in VmFlags) is never
managed: the kernel refuses to drop its pages (MADV_DONTNEED fails with
EINVAL), so reclaiming it would write pages to swap for nothing, on every
pass. A managed range that becomes locked is let go at the next rescan
(every second, and before each reclaim) once no batch holds a page of it;
one unlocked again is managed again by the rescan of a `run` program.

A mapping larger than SPARSE_BYTES (core/sparse.py; UFFDSRV_SPARSE_BYTES
for tests) is managed in chunks where the kernel has PAGEMAP_SCAN: the
scan (in an executor thread) finds its present extents, and only the
2 MiB chunks around them are registered and get a page map; memory never
touched costs nothing. Each rescan scans again and manages the chunks that
became present since. Registering chunks splits the VMA, so maps lists
the pieces: adjacent pieces are joined again before the size is judged.
Without PAGEMAP_SCAN such a mapping is managed whole, as any other.
"""
import asyncio
import errno
import logging
import os
import time

import numpy as np

from ..core import journal, maps, sparse
from ..core.pages import PAGE
from ..core.policy import now_ms
from ..system import kernel, pagemap, proc, procfs, uffd
from .journal_file import JournalFile
from .managed import ManagedProcess, Registry

log = logging.getLogger("uffdsrv.regions")
REGISTER_MODE = uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_WP


class Regions:
    def __init__(self, clients: Registry, journal_file: JournalFile, swap, min_region: int,
                 restore, max_region: int):
        """restore(client, start, end): put the range's reclaimed pages back
        (the fault path's swap-in), awaited before a range is let go."""
        self.clients = clients
        self.journal = journal_file
        self.swap = swap
        self.min_region = min_region
        self.max_region = max_region
        self.restore = restore
        self.sparse_bytes = int(os.environ.get("UFFDSRV_SPARSE_BYTES", sparse.SPARSE_BYTES))

    @property
    def scan(self) -> bool:
        """PAGEMAP_SCAN, as the start-up probe found it (asked lazily: the
        daemon probes first, with its swap file's directory)."""
        return kernel.current().features.get("pagemap_scan", False)

    async def rescan(self, client: ManagedProcess) -> None:
        """Let go of what the process locked; manage the eligible mappings
        of the process that are not yet managed."""
        if client.pid is None or client.closed:
            return
        smaps = procfs.locked_smaps(client.pid)
        locked = maps.locked(smaps) if smaps else []
        if locked:
            await self._let_go_locked(client, locked)
        if not client.auto_maps or client.closed:
            return
        try:
            parsed = maps.parse(proc.read_maps(client.pid))
        except OSError:
            return
        skip = [client.private, *locked]
        found = maps.eligible(parsed, self.min_region, skip, max_bytes=self.max_region)
        for start, end in maps.too_large(parsed, self.min_region, self.max_region, skip):
            if (start, end) not in client.skipped:
                client.skipped.add((start, end))
                log.warning("pid %s: not managing %#x-%#x: %d GiB is more than --max-region "
                            "(%d GiB); reserved address space, not memory", client.pid, start,
                            end, (end - start) >> 30, self.max_region >> 30)
        for start, end in self._sparse_runs(found):
            if self.scan and end - start > self.sparse_bytes:
                await self._manage_sparse(client, start, end)
                if client.closed:
                    return
                continue
            for s, e in client.pages.gaps(start, end):
                self.manage(client, s, e)

    def _sparse_runs(self, found):
        """The eligible mappings, with the pieces our own chunks split a
        mapping into joined again (only where PAGEMAP_SCAN can serve a
        joined run larger than the sparse threshold)."""
        if not self.scan:
            return found
        out = []
        for s, e in sparse.runs(found):
            if e - s > self.sparse_bytes:
                out.append((s, e))
            else:
                out.extend(m for m in found if s <= m[0] and m[1] <= e)
        return out

    async def _manage_sparse(self, client: ManagedProcess, start: int, end: int) -> None:
        """Manage the chunks of [start, end) that hold data, and keep the ones
        already managed (their reclaimed pages are not present, so the scan
        does not see them)."""
        loop = asyncio.get_running_loop()
        try:
            extents = await loop.run_in_executor(None, pagemap.present_extents,
                                                 client.pid, start, end)
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.ENOENT) and (start, end) not in client.skipped:
                client.skipped.add((start, end))
                log.warning("pid %s: cannot scan %#x-%#x: %s", client.pid, start, end, e)
            return
        if client.closed:
            return
        t0 = time.monotonic()
        busy = 0.0  # the loop's time, measured: what other clients' faults wait
        managed = [(r.start + lo * PAGE, r.start + hi * PAGE)
                   for r, lo, hi in client.pages.overlapping(start, end)]
        both = np.concatenate([extents, np.asarray(managed, dtype=np.uint64).reshape(-1, 2)])
        chunks = sparse.chunks(both, start, end)
        if not any(client.pages.gaps(s, e) for s, e in chunks):
            return
        longest = 0.0
        for s, e in chunks:
            # gaps read afresh after each yield: a rescan at HELLO may run
            # beside this one (it holds no lock)
            for gs, ge in client.pages.gaps(s, e):
                self.manage(client, gs, ge, flush=False)
            if time.monotonic() - t0 > 0.002:
                # a few ms of the loop at a time: others' faults wait on it
                self.journal.flush()
                busy += time.monotonic() - t0
                longest = max(longest, time.monotonic() - t0)
                await asyncio.sleep(0)
                t0 = time.monotonic()
                if client.closed:
                    return
        self.journal.flush()
        held = int((extents[:, 1] - extents[:, 0]).sum())
        busy += time.monotonic() - t0
        log.debug("pid %s: %#x-%#x: %d chunks; %.1f ms on the loop, at most %.1f ms at a time",
                  client.pid, start, end, len(chunks), busy * 1e3,
                  max(longest, time.monotonic() - t0) * 1e3)
        if not managed:
            log.info("pid %s: %#x-%#x is %s, %s present: managing it in %d chunks", client.pid,
                     start, end, _size(end - start), _size(held), len(chunks))

    async def rescan_forever(self, interval: float = 1.0) -> None:
        """Programs map new memory as they run: manage it as it appears.
        One client's failure is logged and costs that client's rescan only;
        the task itself never ends. It holds the client's reclaim lock: no
        batch may take pages of a range it is letting go."""
        while True:
            await asyncio.sleep(interval)
            for c in self.clients.all():
                if not c.reclaim_lock.locked():
                    try:
                        async with c.reclaim_lock:
                            await self.rescan(c)
                    except Exception:
                        log.exception("pid %s: rescan of its mappings failed", c.pid)

    def manage(self, client: ManagedProcess, start: int, end: int, flush: bool = True) -> None:
        try:
            uffd.register(client.uffd, start, end - start, REGISTER_MODE)
            present = proc.pagemap_present(client.pid, start, (end - start) // PAGE)
        except OSError as e:
            # tried again at every rescan, said once: EBUSY is a program
            # with a userfaultfd of its own on that range, for as long as
            # it keeps it
            if e.errno not in (errno.ENOMEM, errno.EINVAL, errno.ESRCH, errno.ENOENT) \
                    and (start, end) not in client.skipped:
                client.skipped.add((start, end))
                log.warning("pid %s: cannot manage %#x-%#x: %s", client.pid, start, end, e)
            return
        client.pages.add(start, end, present, now_ms())
        self.journal.add(journal.REGION, client.cid, start, end)
        if flush:
            self.journal.flush()

    async def api_region(self, pid: int, start: int, end: int, register: bool) -> None:
        """REGISTER or UNREGISTER from the explicit API."""
        client = self.clients.by_pid(pid)
        if client is None:
            raise LookupError(f"pid {pid} has no agent connected")
        if not register:
            await self.unmanage(client, start, end)
            return
        if start < client.private[1] and client.private[0] < end:
            raise ValueError("range overlaps the agent's own mapping")
        if end - start > self.max_region:
            raise ValueError(f"{(end - start) >> 20} MiB is more than the server's "
                             f"--max-region ({self.max_region >> 20} MiB)")
        # what the program names explicitly may be anywhere in its private
        # anonymous memory, even right above a guard page
        anon = maps.eligible(maps.parse(proc.read_maps(pid)), 0, skip_thread_stacks=False)
        covered = sum(min(e, end) - max(s, start) for s, e in anon if s < end and start < e)
        if covered != end - start:
            raise ValueError(f"{start:#x}-{end:#x} is not all private anonymous writable memory")
        for s, e in client.pages.gaps(start, end):
            uffd.register(client.uffd, s, e - s, REGISTER_MODE)
            client.pages.add(s, e, proc.pagemap_present(pid, s, (e - s) // PAGE), now_ms())
            self.journal.add(journal.REGION, client.cid, s, e)
        self.journal.flush()

    async def unmanage(self, client: ManagedProcess, start: int, end: int) -> None:
        """Put the range's reclaimed pages back, then stop managing it."""
        async with client.reclaim_lock:
            await self._let_go(client, start, end)

    async def _let_go(self, client: ManagedProcess, start: int, end: int) -> None:
        await self.restore(client, start, end)
        if client.closed:
            return
        left = client.pages.not_present(start, end)
        if left:
            # an unreadable slot stays swapped (read_errors.py), a held
            # batch's zap may still run: unregistered, they would be zeros
            raise OSError(errno.EIO, f"pid {client.pid}: {left} pages of {start:#x}-{end:#x} "
                          "are not back (unreadable swap, or a zap unanswered); "
                          "the range stays managed")
        for r, lo, hi in client.pages.overlapping(start, end):
            try:
                uffd.unregister(client.uffd, r.start + lo * PAGE, (hi - lo) * PAGE)
            except OSError as e:
                log.warning("pid %s: unregister: %s", client.pid, e)
        client.pages.drop(start, end, self.swap.slots)
        self.journal.add(journal.UNMAP, client.cid, start, end)
        self.journal.flush()

    async def _let_go_locked(self, client: ManagedProcess, locked) -> None:
        """Managed ranges the program locked since: their pages back (mlock
        faulted most of them in already), then unregistered. A range a
        batch holds pages of waits for the next rescan: unregistering wakes
        the faults the batch holds, and they would find zeros."""
        managed = [(r.start, r.end) for r in client.pages.regions]
        for s, e in maps.overlap(managed, locked):
            if any(r.batch[lo:hi].any() for r, lo, hi in client.pages.overlapping(s, e)):
                continue
            log.info("pid %s: %#x-%#x is locked in memory (mlock): no longer managed",
                     client.pid, s, e)
            try:
                await self._let_go(client, s, e)
            except OSError as err:
                log.warning("%s; tried again at the next rescan", err.strerror)
            if client.closed:
                return

    def unregister_all(self, client: ManagedProcess) -> None:
        """At a graceful stop, once every page is back: the program goes on
        unmanaged."""
        if client.closed:
            return
        ranges = [(r.start, r.npages * PAGE) for r in client.pages.regions]
        if client.beacon:
            ranges.append((client.beacon, PAGE))
        for start, length in ranges:
            try:
                uffd.unregister(client.uffd, start, length)
            except OSError:
                pass


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} B"
