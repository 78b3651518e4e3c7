"""The server: one process, one event loop (uvloop), many clients.

Start: the swap file and the journal, the ring and its arena, the paths
(faults.py serves faults, reclaim.py reclaims, regions.py says what is
managed, budget_loop.py holds budgets, takeover.py adopts what a dead
server left), the control socket and the metrics endpoint. Each agent
that says HELLO becomes a ManagedProcess whose uffd the ring reads.

Stop (SIGTERM/SIGINT): wait (5 s at most) for every zap sent to be
answered, put every reclaimed page back into its program, unregister, and
exit; the programs go on unmanaged with all their data. A program whose
zap is unanswered, or whose pages could not all be put back, stays
registered, its page map in the journal, for the next server (zaps.py).
"""
import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import time

import numpy as np

from ..core import journal, protocol
from ..core.budgets import Budgets
from ..core.pages import LOADING, PAGE, SWAPPED
from ..core.swapin import MAX_READAHEAD
from ..system import engine as eng
from ..system import kernel, proc, procfs, uffd
from ..system.ring import Ring
from .budget_loop import BudgetLoop
from .buffers import Pool
from .compaction import compact, compact_forever
from .control import ControlSocket, Handlers
from .faults import FaultPath
from .forks import Forks
from .journal_file import JournalFile
from .limits import default_max_region, raise_nofile
from .managed import AgentLink, ManagedProcess, Registry
from .metrics import Metrics
from .reclaim import BATCH_PAGES, ReclaimPath
from .regions import Regions
from .requests import Requests
from .swap import SwapError, SwapFile
from .takeover import Takeover
from .zaps import must_stay, put_back, wait_for_zaps, zap_outstanding

log = logging.getLogger("uffdsrv")
FAULT_BUFFERS = 256
RECLAIM_BUFFERS = 2
REAP_EVERY = 1.0  # seconds between two looks at forked children never identified


class Server:
    def __init__(self, socket_path: str, swap_path: str, swap_size: int,
                 metrics_addr: tuple[str, int] | None = None, min_region: int = 256 << 10,
                 zap_mode: str = "process_madvise", socket_mode: int = 0o600,
                 state_dir: str | None = None, policy: str = "coldest",
                 budgets: Budgets | None = None, allow_uids=(), allow_gids=(),
                 max_region: int | None = None, ram_tier: int = 0, ram_tier_codec: str = "lz4"):
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.allow_uids, self.allow_gids = tuple(allow_uids), tuple(allow_gids)
        self.policy = policy
        self.budgets = budgets or Budgets()
        self.min_region = min_region
        self.max_region = max_region or default_max_region()
        self.zap_flags = protocol.ZAP_MADVISE if zap_mode == "madvise" else 0
        self.metrics_addr = metrics_addr
        self.swap = SwapFile(swap_path, swap_size, ram_tier=ram_tier,
                             ram_tier_codec=ram_tier_codec)
        state_dir = state_dir or os.path.dirname(os.path.abspath(swap_path))
        try:
            self.journal = JournalFile(state_dir)
        except OSError as e:
            self.swap.close()
            raise SwapError(f"cannot open the journal in {state_dir}: {e.strerror}") from None
        self.clients = Registry()
        self.metrics = Metrics()
        self.stopping = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        raise_nofile()
        reclaim_bytes = RECLAIM_BUFFERS * BATCH_PAGES * PAGE
        fault_bytes = FAULT_BUFFERS * MAX_READAHEAD * PAGE
        self.ring = Ring(entries=1024, arena_bytes=reclaim_bytes + fault_bytes)
        self.ring.attach(loop)
        self.metrics.observe(self.clients, self.swap, self.ring)
        self.executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="copyout")
        self.faults = FaultPath(loop, self.ring, self.swap, self.journal, self.metrics,
                                (self.ring.arena_addr + reclaim_bytes, fault_bytes),
                                on_fork=self.forked, on_beacon=self.beacon)
        self.faults.engine.set_tier(self.swap.tier)  # one pool for the server's life
        self.regions = Regions(self.clients, self.journal, self.swap, self.min_region,
                               self.faults.restore, self.max_region)
        self.reclaimer = ReclaimPath(
            loop, self.ring, self.swap, self.journal, self.metrics,
            Pool(self.ring.arena_addr, 0, BATCH_PAGES, RECLAIM_BUFFERS, self.ring.discard),
            self.executor,
            self.policy, self.zap_flags, self.regions.rescan, self._serve_held)
        self.takeover = Takeover(self.journal, self.swap, self.clients, self._adopt,
                                 self.ring.harvest, self.reclaimer.settle)
        self.takeover.recover()
        requests = Requests(self.clients, self.swap, self.reclaimer.reclaim, self.restore_pid,
                            self.metrics)
        self.status = requests.status
        self.control = ControlSocket(
            self.socket_path,
            Handlers(hello=self.attach_agent, agent_lost=self.agent_lost,
                     zap_done=self.zap_answered, region=self.regions.api_region,
                     request=requests.handle, restore=self.restore_pid),
            self.clients, self.metrics, self.socket_mode, self.allow_uids, self.allow_gids)
        self.control.forks = Forks(self.clients, self.faults.restore)  # forks.py
        self.control.start(loop)
        if self.metrics_addr:
            self.metrics.serve(*self.metrics_addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        tier = self.swap.tier
        log.info("serving on %s, swap %s (%d MiB, io %s), ram tier %s", self.socket_path,
                 self.swap.path, self.swap.size >> 20, self.swap.io_mode,
                 "off" if tier is None else f"{tier.stats()['cap_bytes'] >> 20} MiB "
                 f"{self.swap.tier_codec}")
        k = kernel.current(os.path.dirname(os.path.abspath(self.swap.path)))
        self.metrics.kernel(k.features)
        log.log(logging.WARNING if k.missing() else logging.INFO, "%s", k.missing_line())
        tasks = [asyncio.ensure_future(t) for t in (
            self.regions.rescan_forever(), BudgetLoop(self.clients, self.reclaimer.reclaim).run(),
            compact_forever(self.journal, self.clients), self._reap_forever())]
        try:
            await self.stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Settle the zaps in flight (zaps.py), then put every page back and
        unregister; one client's failure is logged and the others go on."""
        log.info("stopping: settling zaps in flight, putting every reclaimed page back")
        self.reclaimer.stopping = True
        self.faults.read_errors.stop()  # no fault ends in SIGBUS in a stop (read_errors.py)
        await wait_for_zaps(self.clients)
        self.control.close()
        for c in self.clients.all():
            async with c.reclaim_lock:  # batches in flight settle first
                pass
        restored = left = 0
        for c in self.clients.live():
            try:
                if not zap_outstanding(c):
                    restored += await put_back(self.faults.restore, c)
                why = None if c.closed else must_stay(c)
                if why is not None:
                    log.warning("pid %s %s; left registered for the next server", c.pid, why)
                    left += 1
                    continue
                self.regions.unregister_all(c)
                self.release(c)
            except Exception:
                log.exception("pid %s: letting it go failed; going on with the others", c.pid)
        self.ring.harvest()
        self.journal.rewrite(journal.snapshot(self.clients.journaled()))
        self.journal.close()
        self.executor.shutdown(wait=False)
        self.faults.close()  # no retry reads the swap file after this (read_errors.py)
        self.swap.close()
        log.info("stopped; %d pages put back, %d programs left registered", restored, left)

    async def _reap_forever(self) -> None:
        """A forked child the server never identified (`_Fork()` and raw
        clone skip the agent's atfork handler; a HELLO may fail) has no
        pidfd to watch: its uffd tells when its mm is gone (ESRCH). Then
        its client, and its references to the parent's slots, go."""
        while True:
            await asyncio.sleep(REAP_EVERY)
            for c in self.clients.live():
                if c.pid is None and time.monotonic() - c.born >= REAP_EVERY \
                        and not mm_alive(c):
                    log.info("an unidentified child of pid %s is gone; releasing it",
                             c.parent_pid)
                    self.release(c)

    # --- clients ----------------------------------------------------------------
    def _adopt(self, client: ManagedProcess) -> None:
        """Start serving a client: its uffd is read, its exit is watched."""
        self.clients.add(client)
        if client.pidfd is not None:
            self.loop.add_reader(client.pidfd, self.exited, client)
        self.faults.start(client)
        self.metrics.clients.inc()

    def attach_agent(self, conn, hello: dict, fd: int | None) -> tuple[ManagedProcess, bool]:
        """A HELLO: a new process, a forked child, or an agent back after
        losing its server. Returns the client and whether fd was kept."""
        pid = conn.pid
        known = self.clients.by_pid(pid)
        back = hello["flags"] & protocol.HELLO_RECONNECT
        if fd is None or (back and known is not None):
            # a forked child (its uffd came with the parent's FORK event),
            # or an agent reconnecting to a server that already holds its uffd
            if known is None and fd is None:
                known = self._forked_child(pid)
            if known is None:
                raise LookupError(f"no forked child with pid {pid} is known")
            client, kept = known, False
        else:
            if known is not None:
                # the same pid with a new uffd: it exec'd, its old mm is gone
                self.release(known)
            client, kept = self._new_client(fd, pid, hello), True
        old, client.agent = client.agent, AgentLink(conn.sock, self.zap_flags)
        if old is not None and old.sock is not conn.sock:
            # its zap is over (an agent says HELLO only then): no wait stays
            # on the dead connection; their batches settle below, or once held
            old.fail_all(ConnectionError(f"agent of pid {pid} reconnected"))
            asyncio.ensure_future(self._settle_reconnected(client, client.agent))
        client.agent_back.set()
        if client.recovering:
            self.takeover.settle(client)
        if client.auto_maps:
            asyncio.ensure_future(self.regions.rescan(client))
        return client, kept

    async def _settle_reconnected(self, client: ManagedProcess, link: AgentLink) -> None:
        """A batch whose wait failed reaches `recovering` a few loop turns
        later (reclaim.py's finally): settle it then, as a HELLO does."""
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not any(b.zap_sent and not b.settled and b not in client.recovering
                       for b in client.batches.values()):
                break
        if client.agent is link and client.recovering and not client.closed:
            self.takeover.settle(client)

    def _new_client(self, fd: int, pid: int, hello: dict) -> ManagedProcess:
        client = ManagedProcess(fd, pid)
        client.pidfd = proc.pidfd_open(pid)
        client.private = hello["private"]
        client.beacon = hello["beacon"]
        client.auto_maps = bool(hello["flags"] & protocol.HELLO_AUTO_MAPS)
        client.cid = self.journal.new_cid()
        client.starttime = procfs.starttime(pid) or 0
        client.budget = self.budgets.for_client(client.comm, procfs.cgroup(pid))
        self.journal.add(journal.CLIENT, client.cid, pid, client.starttime, client.flags)
        self.journal.add(journal.AGENT, client.cid, *client.private, client.beacon)
        self.journal.flush()
        try:
            uffd.register(fd, client.beacon, PAGE, uffd.REGISTER_MODE_MISSING)
        except OSError as e:
            log.warning("pid %s: cannot register the beacon page: %s", pid, e)
            client.beacon = 0
        self._adopt(client)
        log.info("pid %d (%s) connected", pid, client.comm)
        return client

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
        child.born = time.monotonic()
        child.cid = self.journal.new_cid()
        self.journal.add(journal.FORK, child.cid, child.cid, parent.cid)
        self._adopt(child)
        log.info("pid %s forked", parent.pid)

    def beacon(self, client: ManagedProcess, tid: int) -> None:
        """A forked child read its beacon page: its thread id names it."""
        if client.pid is not None:
            return
        client.beacon_tid = tid
        pid = self._child_pid(client, tid)
        if pid is not None:
            self.bind(client, pid)

    def _child_pid(self, client: ManagedProcess, tid: int) -> int | None:
        """Our pid of the child whose thread `tid` (in its own pid ns)
        faulted, or None rather than a guess. If the parent's ns and its
        children's are ours, tid is ours. Else: the one child of the
        parent, no client yet, whose own-ns pid is tid (two children in
        different namespaces may both be pid 2 there: no answer)."""
        parent = client.parent_pid
        if parent is None:
            return None
        ours = procfs.pid_ns("self")
        if ours is not None and procfs.pid_ns(parent) == ours \
                and procfs.pid_ns(parent, for_children=True) == ours:
            return procfs.tgid_of(tid)
        known = {c.pid for c in self.clients.live()}
        found = [p for p in procfs.children(parent)
                 if p not in known and (procfs.nspid(p) or [None])[-1] == tid]
        return found[0] if len(found) == 1 else None

    def _forked_child(self, pid: int) -> ManagedProcess | None:
        """A HELLO from a forked child no beacon named (yet): SO_PEERCRED's
        pid is in our namespace. It is the one unidentified child of its
        parent whose beacon was touched by its own-namespace pid."""
        parent, own = procfs.ppid(pid), (procfs.nspid(pid) or [None])[-1]
        found = [c for c in self.clients.live()
                 if c.pid is None and c.parent_pid == parent and c.beacon_tid == own]
        if len(found) != 1 or not self.bind(found[0], pid):
            return None
        return found[0]

    def bind(self, client: ManagedProcess, pid: int) -> bool:
        """The forked child's pid is known: watch its exit, journal it."""
        try:
            client.pidfd = proc.pidfd_open(pid)
        except OSError:
            return False
        client.pid = pid
        client.starttime = procfs.starttime(pid) or 0
        self.journal.add(journal.BIND, client.cid, pid, client.starttime)
        self.journal.flush()
        client.comm = procfs.comm(pid)
        self.loop.add_reader(client.pidfd, self.exited, client)
        log.info("pid %s is a child of %s", pid, client.parent_pid)
        return True

    async def restore_pid(self, pid: int) -> int:
        """Every page of pid back, and it no longer managed (a debugger or a
        core dump is coming: neither faults through a uffd). The client
        stays, with nothing registered, so that its agent keeps its link
        and no rescan takes the memory back. -> pages put back."""
        client = self.clients.by_pid(pid)
        if client is None:
            raise LookupError(f"pid {pid} is not a managed process")
        h = client.engine
        first = int(h.counters[eng.C["restored"]]) if h is not None else 0
        # a page whose slot cannot be read stays swapped (read_errors.py):
        # let go unregistered, it would read as zeros
        await self.faults.restore(client)
        left = client.pages.count(SWAPPED) + client.pages.count(LOADING)
        if left:
            raise OSError(errno.EIO, f"restore: {left} pages of pid {pid} cannot be read back "
                          "from swap; it stays managed")
        client.auto_maps, client.budget, client.restored = False, None, True
        await self.regions.unmanage(client, 0, protocol.USER_TOP)
        n = int(h.counters[eng.C["restored"]]) - first if h is not None else 0
        compact(self.journal, self.clients)  # else a crash's next server manages it again
        log.info("pid %s: %d pages put back; it is no longer managed", pid, n)
        return n

    def exited(self, client: ManagedProcess) -> None:
        log.info("pid %s exited", client.pid)
        self.release(client)

    def release(self, client: ManagedProcess) -> None:
        """The client is gone (or let go at a stop): free all it holds."""
        if client.closed:
            return
        client.closed = True
        if client.pidfd is not None:
            self.loop.remove_reader(client.pidfd)
        self.faults.stop(client)
        for b in client.recovering:  # their slots go back with the rest
            b.settle(client.pages, self.swap.slots)
        client.recovering = []
        client.pages.release_all(self.swap.slots)
        self.journal.add(journal.EXIT, client.cid)
        self.journal.flush()
        client.close_fds()
        self.clients.remove(client)
        self.metrics.clients.dec()

    def _serve_held(self, client: ManagedProcess, addrs) -> None:
        self.faults.serve(client, addrs, np.zeros(len(addrs), np.int64),
                          np.zeros(len(addrs), np.int64))


def mm_alive(client: ManagedProcess) -> bool:
    """Does the client's mm still exist? Every uffd ioctl that acts takes
    a reference on the mm first and fails with ESRCH once it is gone; an
    un-protect of the beacon page changes nothing in a live child (the
    page is never write-protected: ENOENT, or nothing to do)."""
    try:
        uffd.writeprotect(client.uffd, [client.beacon or 1 << 16], [PAGE], False)
    except OSError as e:
        return e.errno != errno.ESRCH
    return True
