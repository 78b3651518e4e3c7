"""What a peer on a unix socket can do to the process that reads it.

* SCM_RIGHTS: every message may carry fds, whether the protocol wants them
  or not, and the kernel installs them in our table on recvmsg (those that
  do not fit the control buffer it drops, and the drop is a close on our
  thread). The last close of a file runs its filesystem's flush, which a
  FUSE daemon may never answer: such a close must never run on the event
  loop, or every managed program's faults wait behind it.
* A unix socket closed with unread messages in its queue makes the peer's
  next recv fail with ECONNRESET before it reads what we queued for it:
  stop sending, drain, then close (linger).
"""
import array
import asyncio
import os
import queue
import socket
import threading

from ..core import protocol

_to_close: "queue.SimpleQueue[int]" = queue.SimpleQueue()
_closer: threading.Thread | None = None


def close_later(fds: list[int]) -> None:
    """Close fds a peer sent us on a thread of their own. The last close of
    a file runs its filesystem's flush: a FUSE daemon that never answers
    FLUSH would hold the event loop (and every managed program's faults)
    for ever."""
    global _closer
    if not fds:
        return
    for fd in fds:
        _to_close.put(fd)
    if _closer is None:
        _closer = threading.Thread(target=_close_forever, name="fd-closer", daemon=True)
        _closer.start()


def _close_forever() -> None:
    while True:
        fd = _to_close.get()
        try:
            os.close(fd)
        except OSError:
            pass


def received_fds(anc) -> list[int]:
    fds = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def linger(loop: asyncio.AbstractEventLoop, sock: socket.socket, seconds: float = 1.0) -> None:
    """Close a connection so that the peer still reads our last message.

    A unix socket closed with unread messages in its queue makes the peer's
    next recv fail with ECONNRESET, before it can read what we queued for
    it (the ERROR saying why). So: stop sending, then drop what the peer
    still sends until it hangs up, for a second at most, and close."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        return
    fd = sock.fileno()

    def drain(final: bool = False) -> None:
        try:
            while sock.recv(protocol.MAX_MSG):
                pass
            final = True  # the peer hung up
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            final = True
        if final:
            timer.cancel()
            try:
                loop.remove_reader(fd)
            except Exception:
                pass
            sock.close()
    try:
        loop.add_reader(fd, drain)
    except Exception:
        sock.close()
        return
    timer = loop.call_later(seconds, drain, True)


def rights(fds: list[int]) -> list[tuple]:
    """The ancillary data that passes fds (SCM_RIGHTS) with a message."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
