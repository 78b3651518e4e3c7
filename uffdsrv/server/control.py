"""The control socket: one SOCK_SEQPACKET unix socket for agents, the
explicit API and the CLI. The peer's pid comes from SO_PEERCRED, never from
what it says. A malformed message gets an ERROR reply and the connection is
closed; nobody else notices."""
import array
import asyncio
import errno
import logging
import os
import socket
import stat

from ..core import protocol
from ..core.protocol import ProtocolError
from ..system import proc

log = logging.getLogger("uffdsrv.control")
MAX_FDS = 4


class ControlSocket:
    def __init__(self, server, path: str, mode: int = 0o600):
        self.server = server
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
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~mode)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        self.sock.listen(128)
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
        while True:
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept: %s", e)
                return
            s.setblocking(False)
            conn = Connection(self, s)
            self.conns.add(conn)
            self.loop.add_reader(s.fileno(), conn.readable)


class Connection:
    def __init__(self, control: ControlSocket, sock: socket.socket):
        self.control = control
        self.server = control.server
        self.sock = sock
        self.kind = None
        self.client = None
        self.closed = False
        try:
            self.pid, self.uid, self.gid = proc.peer_credentials(sock)
        except OSError:
            self.pid = self.uid = self.gid = -1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.control.loop.remove_reader(self.sock.fileno())
        except Exception:
            pass
        self.control.conns.discard(self)
        if self.kind == "agent" and self.client is not None:
            self.server.agent_lost(self.client, self)
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            log.debug("send to pid %s: %s", self.pid, e)
            self.close()

    def readable(self) -> None:
        while not self.closed:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    protocol.MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            fds = _fds(anc)
            try:
                if not data and not fds:
                    self.close()
                    return
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ProtocolError("message truncated")
                fds = self.dispatch(data, fds)
            except ProtocolError as e:
                self.server.metrics.error("protocol")
                log.warning("pid %s: bad message: %s", self.pid, e)
                self.send(protocol.pack_error(0, errno.EPROTO, str(e)))
                self.close()
            except Exception:  # a bug of ours must cost this peer, not the server
                self.server.metrics.error("internal")
                log.exception("pid %s: message handling failed; dropping the peer", self.pid)
                self.close()
            finally:
                for fd in fds:
                    os.close(fd)

    def dispatch(self, data: bytes, fds: list[int]) -> list[int]:
        """Handle one message; returns the fds it did not keep."""
        mtype, seq = protocol.header(data)
        if mtype == protocol.HELLO:
            if self.kind is not None:
                raise ProtocolError("HELLO twice")
            hello = protocol.parse_hello(data)
            forked = hello["flags"] & protocol.HELLO_FORKED
            if len(fds) != (0 if forked else 1):
                raise ProtocolError(f"HELLO with {len(fds)} fds")
            if not forked and not _is_uffd(fds[0]):
                raise ProtocolError("the fd sent with HELLO is not a userfaultfd")
            try:
                self.client, kept = self.server.attach_agent(self, hello,
                                                             None if forked else fds[0])
            except (LookupError, OSError) as e:
                self.send(protocol.pack_error(seq, getattr(e, "errno", None) or errno.ESRCH,
                                              str(e)))
                self.close()
                return fds
            self.kind = "agent"
            ok = protocol.pack(protocol.HELLO_OK, seq, b"\0" * 8)
            if forked:
                # the child keeps a copy of its uffd, as every agent does, so
                # a server crash cannot unregister its memory
                self.sock.sendmsg([ok], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [self.client.uffd]))])
                return fds
            self.send(ok)
            return fds[1:] if kept else fds
        if mtype == protocol.ZAP_DONE:
            if self.kind != "agent":
                raise ProtocolError("ZAP_DONE from a connection that is not an agent")
            self.server.zap_answered(self.client, seq, protocol.parse_zap_done(data))
        elif mtype in (protocol.REGISTER, protocol.UNREGISTER):
            if self.kind not in (None, "api") or fds:
                raise ProtocolError("REGISTER on an agent connection")
            self.kind = "api"
            start, end = protocol.parse_region(data)
            asyncio.ensure_future(self._region(seq, start, end, mtype == protocol.REGISTER))
        elif mtype == protocol.CTL:
            if self.kind not in (None, "ctl") or fds:
                raise ProtocolError("CTL on an agent connection")
            self.kind = "ctl"
            req = protocol.parse_ctl(data)
            asyncio.ensure_future(self._ctl(seq, req))
        else:
            raise ProtocolError(f"unexpected message type {mtype}")
        return fds

    async def _region(self, seq: int, start: int, end: int, register: bool) -> None:
        try:
            await self.server.api_region(self.pid, start, end, register)
            reply = protocol.pack(protocol.OK, seq)
        except (LookupError, OSError, ValueError) as e:
            reply = protocol.pack_error(seq, getattr(e, "errno", None) or errno.EINVAL, str(e))
        if not self.closed:
            self.send(reply)

    async def _ctl(self, seq: int, req: dict) -> None:
        try:
            reply = await self.server.control_request(req, self)
        except Exception as e:  # a failed request must not take the server down
            log.exception("control request %r failed", req.get("cmd"))
            reply = {"error": f"{type(e).__name__}: {e}"}
        if not self.closed:
            self.send(protocol.pack_ctl(protocol.CTL_REPLY, seq, reply))


def _fds(anc) -> list[int]:
    fds = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _is_uffd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False
