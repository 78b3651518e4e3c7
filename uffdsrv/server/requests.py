"""The CLI's and the API's requests on the control socket: status, reclaim,
limit, restore. Every field is checked here; a peer that is neither root
nor the server's uid acts on, and sees, its own pid only (control.py tells
which peer is privileged, from SO_PEERCRED).

`restore` is for a debugger or a core dump: the kernel reads a process's
memory for /proc/PID/mem, ptrace and the core file without faulting
through a userfaultfd (a remote access cannot wait for a handler, so a
reclaimed page reads as EIO there, and is absent from a core), while
process_vm_readv does fault through it. So every page comes back and the
process is no longer managed: afterwards every reader sees its bytes."""
from ..core.pages import PAGE
from ..system import kernel
from .managed import Registry
from .reclaim import NoAgent


class Requests:
    def __init__(self, clients: Registry, swap, reclaim, restore, metrics=None):
        """reclaim(client, keep_bytes) -> bytes reclaimed; restore(pid) ->
        pages put back (LookupError: not managed)."""
        self.clients = clients
        self.metrics = metrics
        self.swap = swap
        self.reclaim = reclaim
        self.restore = restore

    async def handle(self, req: dict, pid: int, uid: int, privileged: bool) -> dict:
        cmd = req.get("cmd")
        if not privileged:
            if "pid" in req and req["pid"] != pid:
                return {"error": f"uid {uid} may act only on its own pid {pid}"}
            if cmd == "status":
                return self.status(pid)
        if cmd == "status":
            want = req.get("pid")
            if want is not None and not _is_int(want):
                return {"error": "status takes an integer pid or none"}
            return self.status(want)
        if cmd == "reclaim":
            return await self._reclaim(req)
        if cmd == "limit":
            return self._limit(req)
        if cmd == "restore":
            return await self._restore(req)
        return {"error": f"unknown command {cmd!r}"}

    async def _restore(self, req: dict) -> dict:
        pid = req.get("pid")
        if not _is_int(pid):
            return {"error": "restore needs an integer pid"}
        try:
            return {"pid": pid, "restored_pages": await self.restore(pid)}
        except LookupError:
            return {"error": f"pid {pid} is not a managed process"}
        except OSError as e:  # pages that cannot be read back: it stays managed
            return {"error": str(e)}

    async def _reclaim(self, req: dict) -> dict:
        pid, keep = req.get("pid"), req.get("keep_bytes", 0)
        if not _is_int(pid) or not _is_int(keep) or keep < 0:
            return {"error": "reclaim needs an integer pid and keep_bytes >= 0"}
        client = self.clients.by_pid(pid)
        if client is None:
            return {"error": f"pid {pid} is not a managed process"}
        try:
            return {"reclaimed_bytes": await self.reclaim(client, keep)}
        except NoAgent as e:
            return {"error": str(e)}

    def _limit(self, req: dict) -> dict:
        pid, limit = req.get("pid"), req.get("bytes")
        if not _is_int(pid) or not (limit is None or _is_int(limit)) \
                or (limit is not None and limit < 0):
            return {"error": "limit needs an integer pid and bytes >= 0 (or null)"}
        client = self.clients.by_pid(pid)
        if client is None:
            return {"error": f"pid {pid} is not a managed process"}
        client.budget = limit
        return {"pid": pid, "budget_bytes": limit}

    def status(self, pid: int | None = None) -> dict:
        """Every client, or only pid's; `unidentified` counts forked children
        whose pid the server has not learnt (yet)."""
        swap = self.swap
        clients = self.clients.live()
        tier = swap.tier_status()  # None without a RAM tier
        # the pool is the server's own memory: it comes off what reclaim saved
        saved = swap.slots.used * PAGE - (tier["pool_bytes"] if tier else 0)
        # zap_pending: a zap of the client's has gone unanswered (a stopped
        # or frozen program); its batch waits and it is not reclaimed
        return {"clients": [{**c.status(), "zap_pending": bool(c.recovering)} for c in clients
                            if c.pid is not None and (pid is None or c.pid == pid)],
                "unidentified": sum(c.pid is None for c in clients),
                "swap": {"path": swap.path, "size_bytes": swap.size,
                         "used_bytes": swap.slots.used * PAGE,
                         "io_mode": swap.io_mode},
                "tier": tier, "memory_saved_bytes": saved,
                # pages whose swap slot could not be read: their fault got SIGBUS
                "pages_lost_to_io_errors": self.metrics.pages_lost_total if self.metrics else 0,
                "kernel": kernel.current().as_json()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
