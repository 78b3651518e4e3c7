"""Programs that do not run as root: the device, and fork without fork events.

How the kernel decides (fs/userfaultfd.c, 6.x):

* `/dev/userfaultfd` is 0600 root, and its permission is checked at open
  only. `USERFAULTFD_IOC_NEW` on an open device makes a uffd for the
  *caller's* mm, with none of the checks of the `userfaultfd()` syscall
  (vm.unprivileged_userfaultfd = 0 here: an unprivileged caller gets only
  UFFD_USER_MODE_ONLY, and then a `read(fd, zapped_buf)` in the program
  fails with EFAULT instead of faulting through the uffd). So an agent that
  may not open the device asks for ours (DEVICE): the server opens it,
  sends it with SCM_RIGHTS and closes its copy; the agent makes its uffd
  and closes the device. Who gets it: a peer this socket accepts at all
  (root, the server's uid, --allow-uid/--allow-gid: control.py checks
  SO_PEERCRED at accept), the same peers whose HELLO the server takes.
  The device lets its holder make uffds that also catch kernel faults,
  which vm.unprivileged_userfaultfd = 0 is there to deny: allowing a uid
  here grants that to it.

* UFFDIO_API with UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE (EPERM
  otherwise, before any feature is set: the agent asks again without it).
  Without EVENT_FORK a child's copy of every registered VMA is silently
  unregistered (dup_userfaultfd), so a page the parent had zapped reads as
  zeros in the child, and no event tells anyone. The agent keeps fork
  right itself: in its atfork prepare handler it stops its helper from
  zapping (a flag in its own memory, see agent.c) and asks FORK_PREPARE;
  the server holds reclaim of the client (client.forking: no batch starts,
  those in flight settle; the held helper answers their zaps "not done"),
  brings every swapped page back through the fault path, and answers OK
  once none is swapped or loading. Write-protected pages of a batch in
  flight are present, and the kernel clears the uffd-wp bit in a child
  whose VMA is not registered: the child copies their bytes. After fork()
  the parent says FORK_DONE; a closed connection or HOLD_MAX says the
  same, so a program that dies in fork() holds nothing. The child starts
  as a new client from its helper: the device, its own uffd, HELLO.
"""
import array
import asyncio
import errno
import logging
import os
import socket

from ..core import protocol
from ..core.pages import LOADING, SWAPPED
from ..core.protocol import ProtocolError
from .zaps import put_back

log = logging.getLogger("uffdsrv.forks")
DEVICE_PATH = "/dev/userfaultfd"
HOLD_MAX = 60.0  # seconds a FORK_PREPARE holds reclaim without FORK_DONE
NAMES = {protocol.DEVICE: "DEVICE", protocol.FORK_PREPARE: "FORK_PREPARE",
         protocol.FORK_DONE: "FORK_DONE"}


class Forks:
    """FORK_PREPARE/FORK_DONE of the server's clients. restore(client) puts
    every reclaimed page back (the fault path's)."""

    def __init__(self, clients, restore):
        self.clients = clients
        self.restore = restore

    async def prepare(self, conn, seq: int) -> None:
        client = self.clients.by_pid(conn.pid)
        if client is None:  # not managed here: nothing of it is swapped
            conn.send(protocol.pack(protocol.OK, seq))
            return
        client.forking += 1
        try:
            async with client.reclaim_lock:  # the batches in flight settle first
                pass
            await put_back(self.restore, client)
            left = client.pages.count(SWAPPED) + client.pages.count(LOADING)
            if conn.closed:
                return
            if left:
                log.error("pid %s: %d pages could not be brought back before its fork",
                          client.pid, left)
                conn.send(protocol.pack_error(seq, errno.EIO, f"{left} pages are still "
                                                              "swapped out"))
            else:
                conn.send(protocol.pack(protocol.OK, seq))
            deadline = asyncio.get_running_loop().time() + HOLD_MAX
            while not (conn.fork_done.is_set() or conn.closed):
                left_s = deadline - asyncio.get_running_loop().time()
                if left_s <= 0:
                    log.warning("pid %s: no FORK_DONE in %g s; reclaim goes on", client.pid,
                                HOLD_MAX)
                    break
                try:
                    await asyncio.wait_for(conn.fork_done.wait(), min(0.05, left_s))
                except TimeoutError:
                    pass
        finally:
            client.forking -= 1


def dispatch(conn, mtype: int, seq: int, data: bytes, fds: list[int]) -> None:
    """DEVICE, FORK_PREPARE, FORK_DONE on a control connection; any other
    type is a protocol error."""
    name = NAMES.get(mtype)
    if name is None:
        raise ProtocolError(f"unexpected message type {mtype}")
    if fds:
        raise ProtocolError(f"{name} with fds attached")
    protocol.parse_bare(data, name)
    if mtype == protocol.FORK_DONE:
        if conn.kind != "fork":
            raise ProtocolError("FORK_DONE without FORK_PREPARE")
        conn.fork_done.set()
        return
    if conn.kind is not None:
        raise ProtocolError(f"{name} on a {conn.kind} connection")
    if mtype == protocol.DEVICE:
        conn.kind = "device"
        send_device(conn, seq)
        return
    forks = getattr(conn.control, "forks", None)
    if forks is None:
        raise ProtocolError("FORK_PREPARE: this server keeps no fork holds")
    conn.kind = "fork"
    conn.fork_done = asyncio.Event()
    conn._spawn(forks.prepare(conn, seq))


def send_device(conn, seq: int) -> None:
    """OK with an open /dev/userfaultfd, then the connection is over (one
    device per connection; the peer still reads what was sent). Opening a
    character device and closing our copy never block."""
    try:
        fd = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        conn.send(protocol.pack_error(seq, e.errno or errno.EIO,
                                      f"open {DEVICE_PATH}: {e.strerror}"))
        conn.close()
        return
    try:
        conn.sock.sendmsg([protocol.pack(protocol.OK, seq)],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError as e:
        log.debug("sendmsg of the device to pid %s: %s", conn.pid, e)
    finally:
        os.close(fd)
        conn.close()
