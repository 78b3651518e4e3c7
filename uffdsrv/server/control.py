"""The control socket: one SOCK_SEQPACKET unix socket for agents, the
explicit API and the CLI. The peer's pid comes from SO_PEERCRED, never from
what it says. A malformed message gets an ERROR reply and the connection is
closed; nobody else notices.

Hostile peers (tests/e2e/test_hostile.py fuzzes all of this):
* who: with no allow lists the socket is 0600 and only root and the
  server's uid may connect; SO_PEERCRED is checked at accept, not only the
  file mode (core/access.py).
* how many: at most MAX_CONNS connections (more are told and dropped), at
  most MAX_INFLIGHT requests in flight per connection, at most MAX_BURST
  messages handled per wake-up so one peer cannot starve the loop; accept
  backs off on EMFILE instead of spinning.
* which uffd: only one that acts on the peer's own memory and is no other
  client's (admission.py).
* which ranges: REGISTER is checked against the peer's own /proc/PID/maps
  (regions.api_region) and acts through the peer's own, verified uffd.
* which process: a pid is reused once its process is reaped, so a pidfd
  is taken at accept (peer.py) and a message is refused once the process
  that connected has exited: its pid may name another by now.
* how large: a reply bigger than one message (status of hundreds of
  clients) goes as several CTL_REPLY of one seq (core/replies.py); a
  request that fails in any way is answered ERROR, never left waiting."""
import asyncio
import errno
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..core import access, protocol, replies
from ..core.protocol import ProtocolError
from ..core.ratelimit import LogLimit
from ..system import ident, proc, procfs
from . import admission, forks, peer, sockets
from .managed import Registry

log = logging.getLogger("uffdsrv.control")
# fds a message may carry before the kernel drops the rest itself: it
# drops them on *our* thread, and the last close of a peer's file can block
# (FUSE FLUSH, a lingering socket), so take them all and close them elsewhere
SCM_MAX_FD = 253
MAX_CONNS = 4096  # connections at once (unprivileged peers); more are refused
FDS_PER_CLIENT = 4  # an agent's socket and its pidfd, its uffd and the client's pidfd
FD_RESERVE = 256  # the journal, the swap file, the ring, metrics, logs
MAX_INFLIGHT = 16  # requests of one connection awaiting their reply
MAX_BURST = 64  # messages of one connection handled per wake-up
SEND_TIMEOUT = 10.0  # seconds a reply may wait for room in a peer's queue

_log_limit = LogLimit()


def _warn(fmt: str, *args) -> None:
    held = _log_limit.allow()
    if held is not None:
        log.warning(fmt + (f" ({held} more not logged)" if held else ""), *args)


@dataclass(frozen=True)
class Handlers:
    """What the daemon does with what arrives."""
    hello: Callable  # (conn, hello, uffd or None) -> (client, kept the fd)
    agent_lost: Callable  # (client, conn)
    zap_done: Callable  # (client, seq, (bytes, ranges, errno))
    region: Callable  # async (pid, start, end, register)
    request: Callable  # async (req, pid, uid, privileged) -> reply dict
    restore: Callable  # async (pid) -> pages put back; LookupError if not managed


class ControlSocket:
    def __init__(self, path: str, handlers: Handlers, clients: Registry, metrics,
                 mode: int = 0o600, allow_uids=(), allow_gids=()):
        self.handlers = handlers
        self.clients = clients
        self.metrics = metrics
        self.path = path
        self.conns: set[Connection] = set()
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise RuntimeError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
                raise RuntimeError(f"a server is already listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # a stale socket of a server that died
            finally:
                probe.close()
        self.server_uid = os.geteuid()
        # Connections must never take the fds the kernel needs to hand us
        # a forked child's uffd: the forking program waits until it can.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = (soft - FD_RESERVE) // (2 * FDS_PER_CLIENT) if soft != resource.RLIM_INFINITY \
            else MAX_CONNS
        self.max_conns = max(16, min(MAX_CONNS, room))
        self.allow_uids = frozenset(allow_uids or ())
        self.allow_gids = frozenset(allow_gids or ())
        group = None
        if self.allow_uids or self.allow_gids:
            mode, group = access.socket_mode(self.allow_uids, self.allow_gids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777)  # nobody can connect before the mode is final
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        self.sock.listen(512)
        self.sock.setblocking(False)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except Exception:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for c in list(self.conns):
            c.close()

    def _accept(self) -> None:
        for _ in range(MAX_BURST):
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # out of fds: the listening socket stays readable, so a
                # level-triggered reader would spin; pause accepting
                _warn("accept: %s; pausing for 0.1 s", e)
                self.metrics.error("accept")
                self._pause()
                return
            s.setblocking(False)
            conn = Connection(self, s)
            why = self._refusal(conn)
            if why is not None:
                self.metrics.error("refused")
                _warn("pid %s uid %s: refused: %s", conn.pid, conn.uid, why[1])
                try:
                    s.send(protocol.pack_error(0, why[0], why[1]))
                except OSError:
                    pass
                conn.closed = True
                conn.forget_peer()
                sockets.linger(self.loop, s)
                continue
            self.conns.add(conn)
            self.loop.add_reader(s.fileno(), conn.readable)

    def _refusal(self, conn: "Connection") -> tuple[int, str] | None:
        limit = self.max_conns * 2 if conn.privileged else self.max_conns  # room for root
        if len(self.conns) >= limit:
            return errno.EMFILE, f"too many connections ({limit})"
        if conn.uid == 0 or conn.uid == self.server_uid or conn.uid in self.allow_uids:
            return None
        gids = ident.groups(conn.pid, conn.gid) if self.allow_gids and conn.pid > 0 else ()
        if access.peer_allowed(conn.uid, gids, self.server_uid, self.allow_uids,
                               self.allow_gids):
            return None
        return errno.EACCES, f"uid {conn.uid} may not use this server"

    def _pause(self, delay: float = 0.1) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except Exception:
            return

        def resume():
            if self.sock.fileno() >= 0:
                self.loop.add_reader(self.sock.fileno(), self._accept)
        self.loop.call_later(delay, resume)


class Connection:
    def __init__(self, control: ControlSocket, sock: socket.socket):
        self.control = control
        self.handlers = control.handlers
        self.metrics = control.metrics
        self.sock = sock
        self.kind = None
        self.client = None
        self.closed = False
        self.inflight = 0
        try:
            self.pid, self.uid, self.gid = proc.peer_credentials(sock)
        except OSError:
            self.pid = self.uid = self.gid = -1
        self.pidfd = peer.pidfd(sock, self.pid)
        # may act on other pids than its own (reclaim, status of all)
        self.privileged = access.privileged(self.uid, control.server_uid)

    def peer_gone(self) -> bool:
        """Has the process that connected exited (its pid may be another's now)?"""
        return self.pidfd is None or peer.exited(self.pidfd)

    def forget_peer(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)  # a pidfd's close never blocks
            self.pidfd = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.forget_peer()
        try:
            self.control.loop.remove_reader(self.sock.fileno())
        except Exception:
            pass
        self.control.conns.discard(self)
        if self.kind == "agent" and self.client is not None:
            self.handlers.agent_lost(self.client, self)
        sockets.linger(self.control.loop, self.sock)

    def send(self, data: bytes, fd: int | None = None) -> None:
        """A peer gone meanwhile (a fork child that exited at once) is closed."""
        try:
            self.sock.sendmsg([data], [] if fd is None else sockets.rights([fd]))
        except OSError as e:
            log.debug("send to pid %s: %s", self.pid, e)
            self.close()

    def readable(self) -> None:
        for _ in range(MAX_BURST):  # the rest on the next wake-up: others get a turn
            if self.closed:
                return
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    protocol.MAX_MSG, socket.CMSG_SPACE(SCM_MAX_FD * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            fds = sockets.received_fds(anc)
            try:
                if not data and not fds:
                    self.close()
                    return
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ProtocolError("message truncated")
                fds = self.dispatch(data, fds)
            except ProtocolError as e:
                self.metrics.error("protocol")
                _warn("pid %s: bad message: %s", self.pid, e)
                self.send(protocol.pack_error(0, errno.EPROTO, str(e)))
                self.close()
            except Exception:  # a bug of ours must cost this peer, not the server
                self.metrics.error("internal")
                log.exception("pid %s: message handling failed; dropping the peer", self.pid)
                self.close()
            finally:
                sockets.close_later(fds)

    def dispatch(self, data: bytes, fds: list[int]) -> list[int]:
        """Handle one message; returns the fds it did not keep."""
        mtype, seq = protocol.header(data)
        if mtype != protocol.ZAP_DONE and self.peer_gone():
            # SO_PEERCRED's pid may be another process's by now
            self.send(protocol.pack_error(seq, errno.ESRCH,
                                          f"pid {self.pid} that connected has exited"))
            self.close()
            return fds
        if mtype == protocol.HELLO:
            if self.kind is not None:
                raise ProtocolError("HELLO twice")
            hello = protocol.parse_hello(data)
            forked = hello["flags"] & protocol.HELLO_FORKED
            if len(fds) != (0 if forked else 1):
                raise ProtocolError(f"HELLO with {len(fds)} fds")
            if not forked and not procfs.is_uffd(fds[0]):
                raise ProtocolError("the fd sent with HELLO is not a userfaultfd")
            try:
                # a zap helper's HELLO speaks for its program (admission.py)
                self.pid = admission.hello_pid(self.pid, hello)
                if not forked and admission.check_uffd(fds[0], self.pid, hello,
                                                          self.control.clients):
                    # the context this pid's client already holds: the
                    # agent is back, whatever its flags say
                    hello["flags"] |= protocol.HELLO_RECONNECT
                self.client, kept = self.handlers.hello(self, hello,
                                                       None if forked else fds[0])
            except (LookupError, OSError) as e:
                refused = isinstance(e, admission.Refused)
                if refused:
                    self.metrics.error("refused")
                    _warn("pid %s: HELLO refused: %s", self.pid, e.strerror)
                self.send(protocol.pack_error(seq, getattr(e, "errno", None) or errno.ESRCH,
                                              e.strerror if refused else str(e)))
                self.close()
                return fds
            self.kind = "agent"
            ok = protocol.pack(protocol.HELLO_OK, seq, b"\0" * 8)
            if forked:
                # the child keeps a copy of its uffd, as every agent does, so
                # a server crash cannot unregister its memory
                self.send(ok, self.client.uffd)
                return fds
            self.send(ok)
            return fds[1:] if kept else fds
        if mtype == protocol.ZAP_DONE:
            if self.kind != "agent":
                raise ProtocolError("ZAP_DONE from a connection that is not an agent")
            self.handlers.zap_done(self.client, seq, protocol.parse_zap_done(data))
        elif mtype in (protocol.REGISTER, protocol.UNREGISTER):
            if fds:
                raise ProtocolError("REGISTER/UNREGISTER with fds attached")
            if self.kind not in (None, "api"):
                raise ProtocolError(f"REGISTER/UNREGISTER on a {self.kind} connection")
            self.kind = "api"
            start, end = protocol.parse_region(data)
            self._spawn(self._region(seq, start, end, mtype == protocol.REGISTER))
        elif mtype == protocol.CTL:
            if fds:
                raise ProtocolError("CTL with fds attached")
            if self.kind not in (None, "ctl"):
                raise ProtocolError(f"CTL on an {self.kind} connection")
            self.kind = "ctl"
            req = protocol.parse_ctl(data)
            self._spawn(self._ctl(seq, req))
        elif mtype == protocol.RESTORE:
            if fds:
                raise ProtocolError("RESTORE with fds attached")
            if len(data) != protocol.HDR.size:
                raise ProtocolError(f"RESTORE of {len(data)} bytes")
            if self.kind not in (None, "restore"):
                raise ProtocolError(f"RESTORE on an {self.kind} connection")
            if self.control.clients.by_pid(self.pid) is None:
                # an agent's message, as ZAP_DONE is; the CLI's way is a CTL
                raise ProtocolError(f"RESTORE from pid {self.pid}, which is not managed")
            self.kind = "restore"
            self._spawn(self._restore(seq))
        else:  # DEVICE, FORK_PREPARE, FORK_DONE; any other type is an error
            forks.dispatch(self, mtype, seq, data, fds)
        return fds

    def _spawn(self, coro) -> None:
        if self.inflight >= MAX_INFLIGHT:
            coro.close()
            raise ProtocolError(f"more than {MAX_INFLIGHT} requests awaiting their reply")
        self.inflight += 1
        asyncio.ensure_future(coro).add_done_callback(self._done)

    def _done(self, _fut) -> None:
        self.inflight -= 1

    async def _region(self, seq: int, start: int, end: int, register: bool) -> None:
        try:
            await self.handlers.region(self.pid, start, end, register)
            reply = protocol.pack(protocol.OK, seq)
        except Exception as e:  # a refusal, or a bug of ours: either way an answer
            if not isinstance(e, (LookupError, OSError, ValueError)):
                log.exception("pid %s: region request failed", self.pid)
            reply = protocol.pack_error(seq, getattr(e, "errno", None) or errno.EINVAL, str(e))
        if not self.closed:
            self.send(reply)

    async def _restore(self, seq: int) -> None:
        """A core dump or a debugger is coming: OK once every page is back."""
        try:
            await self.handlers.restore(self.pid)
            reply = protocol.pack(protocol.OK, seq)
        except LookupError:
            reply = protocol.pack(protocol.OK, seq)  # gone meanwhile: nothing to bring back
        except Exception as e:  # OSError: pages that cannot be read back, not a bug
            bug = not isinstance(e, OSError)
            log.log(40 if bug else 30, "pid %s: restore failed: %s", self.pid, e, exc_info=bug)
            reply = protocol.pack_error(seq, getattr(e, "errno", None) or errno.EIO, str(e))
        if not self.closed:
            self.send(reply)

    async def _ctl(self, seq: int, req: dict) -> None:
        try:
            reply = await self.handlers.request(req, self.pid, self.uid, self.privileged)
            msgs = [protocol.pack_ctl(protocol.CTL_REPLY, seq, part)
                    for part in replies.split(reply, protocol.MAX_MSG - protocol.HDR.size)]
        except Exception as e:  # a failed request must not take the server down
            log.exception("control request %r failed", req.get("cmd"))
            msgs = [protocol.pack_error(seq, errno.EIO, f"{type(e).__name__}: {e}")]
        if not self.closed:
            if not await peer.send_all(self.control.loop, self.sock, msgs, SEND_TIMEOUT):
                log.debug("pid %s hung up or took no reply for %s s", self.pid, SEND_TIMEOUT)
                self.close()

