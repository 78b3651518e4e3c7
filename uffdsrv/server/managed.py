"""A managed process as the server sees it: its uffd, its page map, the
link to its agent, and the work in flight on it; and the registry of all
of them, which every path is handed instead of the whole server."""
import asyncio
import errno
import os
import socket

from ..core import protocol
from ..core.pages import PAGE, RESIDENT, SWAPPED, PageMap
from ..system import procfs


class AgentLink:
    """The agent's connection: the server sends ZAP requests and the agent's
    zap thread answers each with ZAP_DONE."""

    def __init__(self, sock: socket.socket, zap_flags: int = 0):
        self.sock = sock
        self.zap_flags = zap_flags
        self.waiting: dict[int, asyncio.Future] = {}
        self._seq = 0

    def zap(self, starts, lengths) -> list[asyncio.Future]:
        """One ZAP per MAX_ZAP_RANGES ranges, and a future for each one's
        ZAP_DONE. The agent runs what reached its socket, in order; a ZAP
        that cannot be sent (a stopped or frozen program does not read its
        socket, which then fills up) and every one after it are answered
        at once as not done, with the send's errno, so the batch waits
        only for what was sent."""
        loop = asyncio.get_running_loop()
        futs, err = [], 0
        for i in range(0, len(starts), protocol.MAX_ZAP_RANGES):
            fut = loop.create_future()
            futs.append(fut)
            if not err:
                self._seq += 1
                try:
                    self.sock.send(protocol.pack_zap(
                        self._seq, starts[i:i + protocol.MAX_ZAP_RANGES],
                        lengths[i:i + protocol.MAX_ZAP_RANGES], self.zap_flags))
                except OSError as e:
                    err = e.errno or errno.EIO
                else:
                    self.waiting[self._seq] = fut
                    continue
            fut.set_result((0, 0, err))
        return futs

    def answered(self, seq: int, result) -> None:
        fut = self.waiting.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def fail_all(self, exc: Exception) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiting.clear()


class ManagedProcess:
    def __init__(self, uffd: int, pid: int | None, parent: "ManagedProcess | None" = None):
        self.uffd = uffd
        self.pid = pid
        self.pidfd: int | None = None
        self.parent_pid = parent.pid if parent else None
        self.comm = parent.comm if parent else "?"
        self.pages = PageMap()
        self.agent: AgentLink | None = None
        self.agent_back = asyncio.Event()  # set while an agent is connected
        self.private: tuple[int, int] = (0, 0)
        self.beacon = 0
        self.beacon_tid: int | None = None  # a forked child's tid at its beacon, in its pid ns
        self.born = 0.0  # monotonic seconds: when a forked child's client was made
        self.restored = False  # `restore` took every page back: no longer managed
        self.auto_maps = False
        self.batches: dict = {}
        self.engine = None  # its handle in the native fault engine
        self.read_buf = None
        self.retry: list = []  # (addr, flags, tid) to try again after events were read
        self.retry_scheduled = False
        self.reclaim_lock = asyncio.Lock()
        self.forking = 0  # FORK_PREPAREs holding its reclaim (forks.py)
        self.reclaim_cursor = 0
        self.closed = False
        self.cid = 0  # the journal's name for this client
        self.starttime = 0
        self.recovering: list = []  # batches whose zap a dead server may have sent
        self.skipped: set[tuple[int, int]] = set()  # mappings too large to manage, logged once
        self.read_failures: dict[int, int] = {}  # fault address -> failed swap reads
        self.faults_total = 0
        self.refaults = 0        # faults served from swap
        self.readahead_pages = 0  # pages brought along with them
        self.readahead_misses = 0  # pages read ahead that nobody walked
        self.reclaimed_since_aging = 0
        self.budget: int | None = parent.budget if parent else None
        if pid is not None:
            self.comm = procfs.comm(pid)

    @property
    def flags(self) -> int:
        return protocol.HELLO_AUTO_MAPS if self.auto_maps else 0

    def __repr__(self):
        return f"ManagedProcess(pid={self.pid}, uffd={self.uffd})"

    def status(self) -> dict:
        return {"pid": self.pid, "comm": self.comm,
                "managed_bytes": self.pages.managed_pages * PAGE,
                "resident_bytes": self.pages.count(RESIDENT) * PAGE,
                "swapped_bytes": self.pages.count(SWAPPED) * PAGE,
                "faults_total": self.faults_total,
                "refaults_total": self.refaults,
                "readahead_pages_total": self.readahead_pages,
                "readahead_misses_total": self.readahead_misses,
                "budget_bytes": self.budget,
                "restored": self.restored,
                "agent": self.agent is not None}

    def close_fds(self) -> None:
        for fd in (self.uffd, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd = self.pidfd = None
        if self.agent is not None:
            self.agent.fail_all(ConnectionError("client exited"))
            # its Connection owns the socket and watches it on the loop:
            # closing it under the watch wedged the loop (the agent's zap
            # helper outlives the program by a moment, so the exit often
            # comes first); a shutdown makes the Connection see EOF and
            # close it itself
            try:
                self.agent.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Registry:
    """The managed processes, by the fd number of their uffd (the ring's
    reads name a client by it)."""

    def __init__(self):
        self._by_uffd: dict[int, ManagedProcess] = {}

    def add(self, client: ManagedProcess) -> None:
        self._by_uffd[client.uffd] = client

    def remove(self, client: ManagedProcess) -> None:
        self._by_uffd = {k: v for k, v in self._by_uffd.items() if v is not client}

    def by_pid(self, pid: int) -> ManagedProcess | None:
        return next((c for c in self._by_uffd.values() if c.pid == pid and not c.closed), None)

    def all(self) -> list[ManagedProcess]:
        """A copy: callers release clients while they walk it."""
        return list(self._by_uffd.values())

    def live(self) -> list[ManagedProcess]:
        return [c for c in self._by_uffd.values() if not c.closed]

    def journaled(self) -> list[ManagedProcess]:
        """The clients a journal snapshot must hold."""
        return [c for c in self._by_uffd.values() if not c.closed and c.cid]

    def __len__(self) -> int:
        return len(self._by_uffd)
