"""The server: one process, one event loop (uvloop), many clients.

Start: the swap file, the ring and its arena, the control socket, and the
metrics endpoint. Each agent that says HELLO becomes a ManagedProcess whose uffd
the ring reads. Stop (SIGTERM/SIGINT): let reclaim batches in flight
settle, put every reclaimed page back into its program, unregister, and
exit; the programs go on unmanaged with all their data.
"""
import asyncio
import concurrent.futures
import errno
import logging
import os
import signal

import numpy as np

from .._native import ffi
from ..core import journal, maps, protocol
from ..core.batch import Batch
from ..core.budgets import Budgets
from ..core.pages import LOADING, PAGE, RESIDENT, SWAPPED
from ..core.ranges import byte_ranges, runs
from ..system import proc, procfs, uffd
from ..system.ring import Ring
from .control import ControlSocket
from .faults import MAX_READAHEAD, FaultPath, now_ms
from .journal_file import COMPACT_BYTES, JournalFile
from .managed import AgentLink, ManagedProcess
from .metrics import Metrics
from .reclaim import BATCH_PAGES, NoAgent, ReclaimPath
from .swap import Pool, SwapError, SwapFile

log = logging.getLogger("uffdsrv")
FAULT_BUFFERS = 256
TRACK_WRITES_EVERY = 20  # budget checks (of 50 ms) between two write-tracking sweeps
RECLAIM_BUFFERS = 2
REGISTER_MODE = uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_WP


class Server:
    def __init__(self, socket_path: str, swap_path: str, swap_size: int,
                 metrics_addr: tuple[str, int] | None = None, min_region: int = 256 << 10,
                 zap_mode: str = "process_madvise", socket_mode: int = 0o600,
                 state_dir: str | None = None, policy: str = "coldest",
                 budgets: Budgets | None = None):
        self.socket_path = socket_path
        self.policy = policy
        self.budgets = budgets or Budgets()
        self.socket_mode = socket_mode
        self.swap = SwapFile(swap_path, swap_size)
        self.state_dir = state_dir or os.path.dirname(os.path.abspath(swap_path))
        try:
            self.journal = JournalFile(self.state_dir)
        except OSError as e:
            self.swap.close()
            raise SwapError(f"cannot open the journal in {self.state_dir}: {e.strerror}") from None
        self.metrics_addr = metrics_addr
        self.min_region = min_region
        self.zap_flags = protocol.ZAP_MADVISE if zap_mode == "madvise" else 0
        self.metrics = Metrics()
        self.metrics.attach(self)
        self.clients: dict[int, ManagedProcess] = {}  # by uffd fd number
        self.stopping = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        arena = (RECLAIM_BUFFERS * BATCH_PAGES + FAULT_BUFFERS * MAX_READAHEAD) * PAGE
        self.ring = Ring(entries=1024, arena_bytes=arena)
        self.ring.attach(self.loop)
        self.reclaim_pool = Pool(self.ring.arena_addr, 0, BATCH_PAGES, RECLAIM_BUFFERS)
        self.fault_pool = Pool(self.ring.arena_addr, RECLAIM_BUFFERS * BATCH_PAGES * PAGE,
                               MAX_READAHEAD, FAULT_BUFFERS)
        self.executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="copyout")
        self.faults = FaultPath(self)
        self.reclaimer = ReclaimPath(self)
        await self.recover()
        self.control = ControlSocket(self, self.socket_path, self.socket_mode)
        self.control.start(self.loop)
        if self.metrics_addr:
            self.metrics.serve(*self.metrics_addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        log.info("serving on %s, swap %s (%d MiB)", self.socket_path, self.swap.path,
                 self.swap.size >> 20)
        rescans = asyncio.ensure_future(self._rescan_forever())
        budgets = asyncio.ensure_future(self._hold_budgets())
        try:
            await self.stopping.wait()
        finally:
            rescans.cancel()
            budgets.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        log.info("stopping: putting every reclaimed page back")
        self.control.close()
        for c in list(self.clients.values()):
            async with c.reclaim_lock:  # batches in flight settle first
                pass
        restored = 0
        for c in list(self.clients.values()):
            restored += await self.restore(c)
            self.release(c, unregister=True)
        self.ring.harvest()
        self.journal.rewrite(journal.snapshot(self._journaled()))
        self.journal.close()
        self.executor.shutdown(wait=False)
        self.swap.close()
        log.info("stopped; %d pages put back", restored)

    # --- clients ----------------------------------------------------------------
    def by_pid(self, pid: int) -> ManagedProcess | None:
        return next((c for c in self.clients.values() if c.pid == pid and not c.closed), None)

    def attach_agent(self, conn, hello: dict, fd: int | None) -> tuple[ManagedProcess, bool]:
        """A HELLO: a new process, a forked child, or an agent back after
        losing its server. Returns the client and whether fd was kept."""
        pid = conn.pid
        known = self.by_pid(pid)
        back = hello["flags"] & protocol.HELLO_RECONNECT
        if fd is None or (back and known is not None):
            # a forked child (its uffd came with the parent's FORK event),
            # or an agent reconnecting to a server that already holds its uffd
            if known is None:
                raise LookupError(f"no forked child with pid {pid} is known")
            client, kept = known, False
        else:
            if hello["features"] & uffd.REQUIRED_FEATURES != uffd.REQUIRED_FEATURES:
                raise OSError(errno.EOPNOTSUPP, "the agent's uffd lacks required features")
            if known is not None:
                # the same pid with a new uffd: it exec'd, its old mm is gone
                self.release(known)
            client, kept = ManagedProcess(fd, pid), True
            client.pidfd = proc.pidfd_open(pid)
            self.loop.add_reader(client.pidfd, self.exited, client)
            client.private = hello["private"]
            client.beacon = hello["beacon"]
            client.auto_maps = bool(hello["flags"] & protocol.HELLO_AUTO_MAPS)
            client.cid = self.journal.new_cid()
            client.starttime = procfs.starttime(pid) or 0
            client.budget = self.budgets.for_client(client.comm, procfs.cgroup(pid))
            self.journal.add(journal.CLIENT, client.cid, pid, client.starttime, client.flags)
            self.journal.add(journal.AGENT, client.cid, *client.private, client.beacon)
            self.journal.flush()
            self.clients[fd] = client
            try:
                uffd.register(fd, client.beacon, PAGE, uffd.REGISTER_MODE_MISSING)
            except OSError as e:
                log.warning("pid %s: cannot register the beacon page: %s", pid, e)
                client.beacon = 0
            self.faults.start(client)
            self.metrics.clients.inc()
            log.info("pid %d (%s) connected", pid, client.comm)
        client.agent = AgentLink(conn.sock, self.zap_flags)
        client.agent_back.set()
        if client.recovering:
            self.settle_recovery(client)
        if client.auto_maps:
            asyncio.ensure_future(self.rescan(client))
        return client, kept

    def agent_lost(self, client: ManagedProcess, conn) -> None:
        if client.agent is not None and client.agent.sock is conn.sock:
            client.agent.fail_all(ConnectionError(f"agent of pid {client.pid} disconnected"))
            client.agent = None
            client.agent_back.clear()

    def zap_answered(self, client: ManagedProcess, seq: int, result) -> None:
        # The REMOVE events of this zap were read before the agent could
        # answer: apply them before anyone sees the zap finish.
        self.ring.harvest()
        if client.agent is not None:
            client.agent.answered(seq, result)

    def forked(self, parent: ManagedProcess, fd: int) -> None:
        child = ManagedProcess(fd, None, parent)
        child.pages = parent.pages.fork(self.swap.slots)
        child.private, child.beacon = parent.private, parent.beacon
        child.auto_maps = parent.auto_maps
        child.cid = self.journal.new_cid()
        self.journal.add(journal.FORK, child.cid, child.cid, parent.cid)
        self.clients[fd] = child
        self.faults.start(child)
        self.metrics.clients.inc()
        log.info("pid %s forked", parent.pid)

    def beacon(self, client: ManagedProcess, tid: int) -> None:
        """A forked child read its beacon page: its thread id names it."""
        if client.pid is not None:
            return
        pid = procfs.tgid_of(tid)
        if pid is None:
            return
        try:
            client.pidfd = proc.pidfd_open(pid)
        except OSError:
            return
        client.pid = pid
        client.starttime = procfs.starttime(pid) or 0
        self.journal.add(journal.BIND, client.cid, pid, client.starttime)
        self.journal.flush()
        client.comm = procfs.comm(pid)
        self.loop.add_reader(client.pidfd, self.exited, client)
        log.info("pid %s is a child of %s", pid, client.parent_pid)

    def exited(self, client: ManagedProcess) -> None:
        log.info("pid %s exited", client.pid)
        self.release(client)

    def release(self, client: ManagedProcess, unregister: bool = False) -> None:
        if client.closed:
            return
        client.closed = True
        if client.pidfd is not None:
            self.loop.remove_reader(client.pidfd)
        self.faults.stop(client)
        if unregister:
            for r in client.pages.regions:
                try:
                    uffd.unregister(client.uffd, r.start, r.npages * PAGE)
                except OSError:
                    pass
            if client.beacon:
                try:
                    uffd.unregister(client.uffd, client.beacon, PAGE)
                except OSError:
                    pass
        for b in client.recovering:  # their slots go back with the rest
            b.settle(client.pages, self.swap.slots)
        client.recovering = []
        client.pages.release_all(self.swap.slots)
        self.journal.add(journal.EXIT, client.cid)
        self.journal.flush()
        client.close_fds()
        self.clients = {k: v for k, v in self.clients.items() if v is not client}
        self.metrics.clients.dec()

    # --- regions -----------------------------------------------------------------
    async def rescan(self, client: ManagedProcess) -> None:
        """Manage the eligible mappings of the process that are not yet
        managed: register first, then read which pages are present (a page
        never present is a zero page)."""
        if not client.auto_maps or client.pid is None or client.closed:
            return
        try:
            found = maps.eligible(maps.parse(proc.read_maps(client.pid)), self.min_region,
                                  exclude=[client.private])
        except OSError:
            return
        for start, end in found:
            for s, e in client.pages.gaps(start, end):
                self.manage(client, s, e)

    async def _hold_budgets(self, interval: float = 0.05) -> None:
        """Keep each client at or below its budget. Reclaim starts when the
        resident memory goes over and takes it a little further down (an
        eighth of the budget, at most one batch), so that a program growing
        steadily is served a batch at a time, not a page at a time."""
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            for c in list(self.clients.values()):
                if c.budget is None or c.agent is None or c.reclaim_lock.locked():
                    continue
                if ticks % TRACK_WRITES_EVERY == 0:
                    self._track_writes(c)
                resident = c.pages.count(RESIDENT) * PAGE
                if resident > c.budget:
                    ahead = min(c.budget // 8, BATCH_PAGES * PAGE)
                    asyncio.ensure_future(self._enforce(c, max(0, c.budget - ahead)))

    def _track_writes(self, client: ManagedProcess) -> None:
        """Write tracking with synchronous write-protect faults (no access
        bits reach us): protect the resident pages of a budgeted program;
        the first write to each then faults once, the fault path marks the
        page warm and lets the write through."""
        for r in client.pages.regions:
            idx = np.flatnonzero((r.state == RESIDENT) & (r.batch == 0))
            if len(idx):
                starts, lens = byte_ranges(r.start, idx)
                try:
                    uffd.writeprotect(client.uffd, starts, lens, True)
                except OSError:
                    return

    async def _enforce(self, client: ManagedProcess, keep: int) -> None:
        try:
            await self.reclaimer.reclaim(client, keep)
        except NoAgent:
            pass

    async def _rescan_forever(self, interval: float = 1.0) -> None:
        """Programs map new memory as they run: manage it as it appears."""
        while True:
            await asyncio.sleep(interval)
            for c in list(self.clients.values()):
                if c.auto_maps and not c.reclaim_lock.locked():
                    await self.rescan(c)
            if (self.journal.size > COMPACT_BYTES
                    and not any(c.batches for c in self.clients.values())):
                self.journal.rewrite(journal.snapshot(self._journaled()))

    def manage(self, client: ManagedProcess, start: int, end: int) -> None:
        try:
            uffd.register(client.uffd, start, end - start, REGISTER_MODE)
            present = proc.pagemap_present(client.pid, start, (end - start) // PAGE)
        except OSError as e:
            if e.errno not in (errno.ENOMEM, errno.EINVAL, errno.ESRCH, errno.ENOENT):
                log.warning("pid %s: cannot manage %#x-%#x: %s", client.pid, start, end, e)
            return
        region = client.pages.add(start, end, present)
        region.stamp[:] = now_ms()
        self.journal.add(journal.REGION, client.cid, start, end)
        self.journal.flush()

    async def api_region(self, pid: int, start: int, end: int, register: bool) -> None:
        client = self.by_pid(pid)
        if client is None:
            raise LookupError(f"pid {pid} has no agent connected")
        if not register:
            await self.unmanage(client, start, end)
            return
        if start < client.private[1] and client.private[0] < end:
            raise ValueError("range overlaps the agent's own mapping")
        # what the program names explicitly may be anywhere in its private
        # anonymous memory, even right above a guard page
        anon = maps.eligible(maps.parse(proc.read_maps(pid)), 0, skip_thread_stacks=False)
        covered = sum(min(e, end) - max(s, start) for s, e in anon if s < end and start < e)
        if covered != end - start:
            raise ValueError(f"{start:#x}-{end:#x} is not all private anonymous writable memory")
        for s, e in client.pages.gaps(start, end):
            uffd.register(client.uffd, s, e - s, REGISTER_MODE)
            client.pages.add(s, e, proc.pagemap_present(pid, s, (e - s) // PAGE))
            self.journal.add(journal.REGION, client.cid, s, e)
        self.journal.flush()

    async def unmanage(self, client: ManagedProcess, start: int, end: int) -> None:
        """Put the range's reclaimed pages back, then stop managing it."""
        async with client.reclaim_lock:
            await self.restore(client, start, end)
            if client.closed:
                return
            for r, lo, hi in client.pages.overlapping(start, end):
                try:
                    uffd.unregister(client.uffd, r.start + lo * PAGE, (hi - lo) * PAGE)
                except OSError as e:
                    log.warning("pid %s: unregister: %s", client.pid, e)
            client.pages.drop(start, end, self.swap.slots)
            self.journal.add(journal.UNMAP, client.cid, start, end)
            self.journal.flush()

    # --- takeover after a crash ------------------------------------------------
    def _journaled(self) -> list[ManagedProcess]:
        return [c for c in self.clients.values() if not c.closed and c.cid]

    async def recover(self) -> None:
        """Take over every program the journal says a previous server
        managed: its uffd comes from the process itself (pidfd_getfd), its
        page map from the journal, refined by what is present now."""
        data = self.journal.read()
        if not data:
            return
        recovered, slots = journal.replay(data, self.swap.slots.nslots)
        self.swap.slots = slots
        self.journal.next_cid = max([0, *recovered]) + 1
        taken = 0
        for rec in recovered.values():
            client = self._take_over(rec)
            if client is None:
                rec.pages.release_all(slots)
            else:
                taken += 1
        self.journal.rewrite(journal.snapshot(self._journaled()))
        log.info("took over %d of %d programs from the journal; %d pages in swap",
                 taken, len(recovered), slots.used)

    def _take_over(self, rec) -> ManagedProcess | None:
        pid = rec.pid
        if not pid or procfs.starttime(pid) != rec.starttime:
            return None
        num = procfs.find_uffd(pid)
        if num is None:
            log.error("pid %d: no uffd found to take over; its reclaimed pages wait", pid)
            return None
        try:
            pidfd = proc.pidfd_open(pid)
            fd = proc.pidfd_getfd(pidfd, num, pid)
        except OSError as e:
            log.error("pid %d: cannot take its uffd back: %s", pid, e)
            return None
        client = ManagedProcess(fd, pid)
        client.pidfd, client.cid, client.starttime = pidfd, rec.cid, rec.starttime
        client.private, client.beacon = rec.private, rec.beacon
        client.auto_maps = bool(rec.flags & protocol.HELLO_AUTO_MAPS)
        client.pages = rec.pages
        for r in client.pages.regions:
            try:
                present = proc.pagemap_present(pid, r.start, r.npages)
            except OSError:
                continue
            r.state[present & (r.state == 0)] = 1  # EMPTY -> RESIDENT
            # Recorded as swapped yet still present: the dead server's zap of
            # these pages may still be on its way. Hold them as a batch whose
            # zap was sent, until the agent is back (its zap thread then is
            # idle) and the REMOVEs it raised have been read.
            # Recorded as swapped, present, and its zap settled: it was faulted
            # back in and the FREE did not make it to the journal.
            back = np.flatnonzero(present & (r.state == SWAPPED) & (r.expect == 0))
            if len(back):
                self.swap.slots.release(r.slot[back])
                r.state[back], r.slot[back] = 1, -1
                for s, n in zip(*runs(back)):
                    self.journal.add(journal.FREE, rec.cid, r.start + int(s) * PAGE, int(n))
            pending = (r.state == SWAPPED) & (r.expect > 0)
            idx = np.flatnonzero(present & pending)       # not zapped yet
            gaps = np.flatnonzero(~present & pending)     # zapped, or stepped over
            r.expect[:] = 0
            if len(idx) or len(gaps):
                slots_of = r.slot[idx].copy()
                b = Batch(r, idx)
                b.slots[:] = slots_of
                b.set_slots(client.pages, np.arange(len(idx)), slots_of)
                b.add_gaps(r, gaps)
                b.expect_zap(client.pages, np.arange(len(b)))
                client.batches[b.id] = b
                client.recovering.append(b)
        self.clients[fd] = client
        self.loop.add_reader(pidfd, self.exited, client)
        self.faults.start(client)
        self.metrics.clients.inc()
        # Faults the dead server had read but not served wait for a wake;
        # woken, they fault again and reach us.
        ranges = [(r.start, r.npages * PAGE) for r in client.pages.regions]
        if client.beacon:
            ranges.append((client.beacon, PAGE))
        for start, length in ranges:
            try:
                uffd.wake(fd, [start], [length])
            except OSError:
                pass
        log.info("pid %d (%s): taken over, %d pages in swap", pid, client.comm,
                 client.pages.count(SWAPPED))
        return client

    def settle_recovery(self, client: ManagedProcess) -> None:
        """The agent is back, so no zap of the dead server is still running,
        and the REMOVEs it raised were read before it could finish."""
        self.ring.harvest()
        for b in client.recovering:
            self.reclaimer.settle(client, b, b.addrs.copy(), b.addrs.copy())
        client.recovering = []
        self.journal.flush()

    # --- control requests ----------------------------------------------------------
    async def control_request(self, req: dict, conn) -> dict:
        cmd = req.get("cmd")
        # access (control.py): only root and the server's uid act on or see
        # other pids than the peer's own
        if not getattr(conn, "privileged", True):
            if "pid" in req and req["pid"] != conn.pid:
                return {"error": f"uid {conn.uid} may act only on its own pid {conn.pid}"}
            if cmd == "status":
                st = self.status()
                st["clients"] = [c for c in st["clients"] if c["pid"] == conn.pid]
                return st
        if cmd == "status":
            return self.status()
        if cmd == "reclaim":
            pid, keep = req.get("pid"), req.get("keep_bytes", 0)
            if not isinstance(pid, int) or not isinstance(keep, int) or keep < 0:
                return {"error": "reclaim needs an integer pid and keep_bytes >= 0"}
            client = self.by_pid(pid)
            if client is None:
                return {"error": f"pid {pid} is not a managed process"}
            try:
                return {"reclaimed_bytes": await self.reclaimer.reclaim(client, keep)}
            except NoAgent as e:
                return {"error": str(e)}
        if cmd == "limit":
            pid, limit = req.get("pid"), req.get("bytes")
            if not isinstance(pid, int) or not (limit is None or isinstance(limit, int)) \
                    or (limit is not None and limit < 0):
                return {"error": "limit needs an integer pid and bytes >= 0 (or null)"}
            client = self.by_pid(pid)
            if client is None:
                return {"error": f"pid {pid} is not a managed process"}
            client.budget = limit
            return {"pid": pid, "budget_bytes": limit}
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        return {"clients": [c.status() for c in self.clients.values() if c.pid is not None],
                "swap": {"path": self.swap.path, "size_bytes": self.swap.size,
                         "used_bytes": self.swap.slots.used * PAGE}}

    # --- putting pages back ------------------------------------------------------------
    async def restore(self, client: ManagedProcess, start: int = 0, end: int = 1 << 64) -> int:
        """Put every reclaimed page of the client (in [start, end)) back."""
        buf = ffi.new("char[]", MAX_READAHEAD * PAGE)
        addr = int(ffi.cast("uintptr_t", buf))
        view = ffi.buffer(buf)
        restored = 0
        for _ in range(100000):
            if client.closed:
                break
            todo = False
            for r, lo, hi in client.pages.overlapping(start, end):
                idx = np.flatnonzero(r.state[lo:hi] == SWAPPED) + lo
                todo = todo or bool(np.any(r.state[lo:hi] == LOADING))
                for i in idx.tolist():
                    if r.state[i] != SWAPPED:
                        continue
                    slot = int(r.slot[i])
                    k = 1
                    while (k < MAX_READAHEAD and i + k < hi and r.state[i + k] == SWAPPED
                           and r.slot[i + k] == slot + k):
                        k += 1
                    chunk = memoryview(view)[:k * PAGE]
                    if os.preadv(self.swap.fd, [chunk], slot * PAGE) != k * PAGE:
                        log.error("pid %s: short read of swap slot %d", client.pid, slot)
                        continue
                    n, res = uffd.copy(client.uffd, [r.start + i * PAGE], [addr], [k * PAGE])
                    got = int(res[0]) if n else -errno.EAGAIN
                    done = k if got == -errno.EEXIST else max(got, 0) // PAGE
                    if done:
                        self.journal.add(journal.FREE, client.cid, r.start + i * PAGE, done)
                        self.swap.slots.release(r.slot[i:i + done])
                        r.slot[i:i + done] = -1
                        r.state[i:i + done] = 1
                        restored += done
                    if done < k:
                        todo = True
                        if got == -errno.ESRCH:
                            return restored
            self.journal.flush()
            if not todo:
                break
            self.ring.harvest()
            await asyncio.sleep(0)
        return restored
