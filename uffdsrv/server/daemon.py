"""The server: one process, one event loop (uvloop), many clients.

Start: the swap file, the ring and its arena, the control socket, and the
metrics endpoint. Each agent that says HELLO becomes a Client whose uffd
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
from ..core import maps, protocol
from ..core.pages import LOADING, PAGE, SWAPPED
from ..system import proc, uffd
from ..system.ring import Ring
from .control import ControlSocket
from .faults import MAX_READAHEAD, FaultPath
from .managed import AgentLink, Client
from .metrics import Metrics
from .reclaim import BATCH_PAGES, NoAgent, ReclaimPath
from .swap import Pool, SwapFile

log = logging.getLogger("uffdsrv")
FAULT_BUFFERS = 256
RECLAIM_BUFFERS = 2
REGISTER_MODE = uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_WP


class Server:
    def __init__(self, socket_path: str, swap_path: str, swap_size: int,
                 metrics_addr: tuple[str, int] | None = None, min_region: int = 256 << 10,
                 zap_mode: str = "process_madvise", socket_mode: int = 0o600):
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.swap = SwapFile(swap_path, swap_size)
        self.metrics_addr = metrics_addr
        self.min_region = min_region
        self.zap_flags = protocol.ZAP_MADVISE if zap_mode == "madvise" else 0
        self.metrics = Metrics()
        self.metrics.attach(self)
        self.clients: dict[int, Client] = {}  # by uffd fd number
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
        self.control = ControlSocket(self, self.socket_path, self.socket_mode)
        self.control.start(self.loop)
        if self.metrics_addr:
            self.metrics.serve(*self.metrics_addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        log.info("serving on %s, swap %s (%d MiB)", self.socket_path, self.swap.path,
                 self.swap.size >> 20)
        rescans = asyncio.ensure_future(self._rescan_forever())
        try:
            await self.stopping.wait()
        finally:
            rescans.cancel()
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
        self.executor.shutdown(wait=False)
        self.swap.close()
        log.info("stopped; %d pages put back", restored)

    # --- clients ----------------------------------------------------------------
    def by_pid(self, pid: int) -> Client | None:
        return next((c for c in self.clients.values() if c.pid == pid and not c.closed), None)

    def attach_agent(self, conn, hello: dict, fd: int | None) -> Client:
        pid = conn.pid
        if fd is None:  # a forked child: its uffd came with the parent's FORK event
            client = self.by_pid(pid)
            if client is None:
                raise LookupError(f"no forked child with pid {pid} is known")
        else:
            if hello["features"] & uffd.REQUIRED_FEATURES != uffd.REQUIRED_FEATURES:
                raise OSError(errno.EOPNOTSUPP, "the agent's uffd lacks required features")
            old = self.by_pid(pid)
            if old is not None:
                # the same pid with a new uffd: it exec'd, its old mm is gone
                self.release(old)
            client = Client(fd, pid)
            client.pidfd = proc.pidfd_open(pid)
            self.loop.add_reader(client.pidfd, self.exited, client)
            client.private = hello["private"]
            client.beacon = hello["beacon"]
            client.auto_maps = bool(hello["flags"] & protocol.HELLO_AUTO_MAPS)
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
        if client.auto_maps:
            asyncio.ensure_future(self.rescan(client))
        return client

    def agent_lost(self, client: Client, conn) -> None:
        if client.agent is not None and client.agent.sock is conn.sock:
            client.agent.fail_all(ConnectionError(f"agent of pid {client.pid} disconnected"))
            client.agent = None

    def zap_answered(self, client: Client, seq: int, result) -> None:
        # The REMOVE events of this zap were read before the agent could
        # answer: apply them before anyone sees the zap finish.
        self.ring.harvest()
        if client.agent is not None:
            client.agent.answered(seq, result)

    def forked(self, parent: Client, fd: int) -> None:
        child = Client(fd, None, parent)
        child.pages = parent.pages.fork(self.swap.slots)
        child.private, child.beacon = parent.private, parent.beacon
        child.auto_maps = parent.auto_maps
        self.clients[fd] = child
        self.faults.start(child)
        self.metrics.clients.inc()
        log.info("pid %s forked", parent.pid)

    def beacon(self, client: Client, tid: int) -> None:
        """A forked child read its beacon page: its thread id names it."""
        if client.pid is not None:
            return
        pid = proc.tgid_of(tid)
        if pid is None:
            return
        try:
            client.pidfd = proc.pidfd_open(pid)
        except OSError:
            return
        client.pid = pid
        from .managed import read_comm
        client.comm = read_comm(pid)
        self.loop.add_reader(client.pidfd, self.exited, client)
        log.info("pid %s is a child of %s", pid, client.parent_pid)

    def exited(self, client: Client) -> None:
        log.info("pid %s exited", client.pid)
        self.release(client)

    def release(self, client: Client, unregister: bool = False) -> None:
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
        client.pages.release_all(self.swap.slots)
        client.close_fds()
        self.clients = {k: v for k, v in self.clients.items() if v is not client}
        self.metrics.clients.dec()

    # --- regions -----------------------------------------------------------------
    async def rescan(self, client: Client) -> None:
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

    async def _rescan_forever(self, interval: float = 1.0) -> None:
        """Programs map new memory as they run: manage it as it appears."""
        while True:
            await asyncio.sleep(interval)
            for c in list(self.clients.values()):
                if c.auto_maps and not c.reclaim_lock.locked():
                    await self.rescan(c)

    def manage(self, client: Client, start: int, end: int) -> None:
        try:
            uffd.register(client.uffd, start, end - start, REGISTER_MODE)
            present = proc.pagemap_present(client.pid, start, (end - start) // PAGE)
        except OSError as e:
            if e.errno not in (errno.ENOMEM, errno.EINVAL, errno.ESRCH, errno.ENOENT):
                log.warning("pid %s: cannot manage %#x-%#x: %s", client.pid, start, end, e)
            return
        client.pages.add(start, end, present)

    async def api_region(self, pid: int, start: int, end: int, register: bool) -> None:
        client = self.by_pid(pid)
        if client is None:
            raise LookupError(f"pid {pid} has no agent connected")
        if not register:
            await self.unmanage(client, start, end)
            return
        if start < client.private[1] and client.private[0] < end:
            raise ValueError("range overlaps the agent's own mapping")
        anon = maps.eligible(maps.parse(proc.read_maps(pid)), 0)
        covered = sum(min(e, end) - max(s, start) for s, e in anon if s < end and start < e)
        if covered != end - start:
            raise ValueError(f"{start:#x}-{end:#x} is not all private anonymous writable memory")
        for s, e in client.pages.gaps(start, end):
            uffd.register(client.uffd, s, e - s, REGISTER_MODE)
            client.pages.add(s, e, proc.pagemap_present(pid, s, (e - s) // PAGE))

    async def unmanage(self, client: Client, start: int, end: int) -> None:
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

    # --- control requests ----------------------------------------------------------
    async def control_request(self, req: dict, conn) -> dict:
        cmd = req.get("cmd")
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
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        return {"clients": [c.status() for c in self.clients.values() if c.pid is not None],
                "swap": {"path": self.swap.path, "size_bytes": self.swap.size,
                         "used_bytes": self.swap.slots.used * PAGE}}

    # --- putting pages back ------------------------------------------------------------
    async def restore(self, client: Client, start: int = 0, end: int = 1 << 64) -> int:
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
                        self.swap.slots.release(r.slot[i:i + done])
                        r.slot[i:i + done] = -1
                        r.state[i:i + done] = 1
                        restored += done
                    if done < k:
                        todo = True
                        if got == -errno.ESRCH:
                            return restored
            if not todo:
                break
            self.ring.harvest()
            await asyncio.sleep(0)
        return restored
