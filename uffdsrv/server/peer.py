"""Who is at the other end of a control connection, and getting replies
to it.

SO_PEERCRED names the pid that called connect(), as a number. A number
is reused once its process is reaped, so a connection kept by a process
that exited would act on whatever process gets the number next. A pidfd
names the process itself: SO_PEERPIDFD (Linux 6.5+) hands one for the
connecting process; before it, pidfd_open of the number at accept leaves
only the window between the peer's connect and our accept. A pidfd polls
readable from the moment its process exits, and the number can be reused
only after that (the exit comes before the reaping), so "not readable"
proves the number still names the process that connected.

A SOCK_SEQPACKET send is all or nothing: on a non-blocking socket whose
peer's queue is full it fails with EAGAIN and sends nothing, so a reply
in several messages waits for room between them.
"""
import asyncio
import errno
import select
import socket

from ..system import proc

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+; not in older headers


def pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the process that connected, or None if it is gone."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            # the peer is reaped: 6.18 still hands a pidfd (it polls as
            # exited), earlier kernels refuse; its number may be another
            # process's by now, so never pidfd_open it
            return None
    if pid <= 0:
        return None
    try:
        return proc.pidfd_open(pid)
    except OSError:
        return None


def exited(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


async def send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, msgs: list[bytes],
                   timeout: float) -> bool:
    """Send the messages in order, waiting up to `timeout` seconds for room
    before each; False if the peer did not make room (or hung up)."""
    for m in msgs:
        while True:
            try:
                sock.send(m)
                break
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return False
            fd = sock.fileno()
            if fd < 0:
                return False
            room = loop.create_future()
            loop.add_writer(fd, lambda f=room: f.done() or f.set_result(None))
            try:
                await asyncio.wait_for(room, timeout)
            except TimeoutError:
                return False
            finally:
                try:
                    loop.remove_writer(fd)
                except Exception:
                    pass
    return True
