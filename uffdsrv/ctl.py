"""The control socket, from the client's side: the one place that talks to
a running server (the CLI, `uffdsrv top`, the demo, the Python client's
`limit`, the test harness and the benchmark all come through here).

The socket is AF_UNIX SOCK_SEQPACKET: one send is one message and one recv
returns exactly one message, so there is no framing to do. A request is a
CTL message whose body is a JSON object ({"cmd": ..., fields}); the server
answers with a CTL_REPLY carrying the request's sequence number, or with
ERROR (a message it could not accept: it then drops the connection). A
well-formed request it will not carry out gets a CTL_REPLY {"error": text}
and the connection stays usable.

How a missing or unwilling server shows up, and what it becomes here:

* nothing bound at the path: connect() -> ENOENT; a socket file whose
  server died: ECONNREFUSED                                -> Unreachable
* the socket's mode or a directory on the way: EACCES/EPERM -> Unreachable
* the server refuses the peer at accept (SO_PEERCRED not allowed): an
  ERROR waits in our queue and the connection is closed; a send may
  already fail with EPIPE, the recv still returns the ERROR  -> ControlError
* recv() returning b"": the server closed the connection  -> Unreachable

The server answers the requests of one connection as they finish, so a
kept Connection matches replies by sequence number and drops a late reply
to a request that timed out. A reply larger than one message (status of
hundreds of clients) comes as several CTL_REPLY of the same sequence
number, joined here (core/replies.py).
"""
import errno as _errno
import socket
import threading

from .core import protocol, replies

__all__ = ["Connection", "ControlError", "Unreachable", "request", "restore"]


class ControlError(Exception):
    """The server refused the request. str(e) is the server's text; errno
    is the one an ERROR message carried (None for an {"error": ...}
    reply)."""

    def __init__(self, text: str, errno: int | None = None):
        super().__init__(text)
        self.errno = errno


class Unreachable(ControlError):
    """No answer: nothing listening, permission denied, timeout, or the
    connection closed. str(e) is one line that says which."""


def _unreachable(path: str, e: OSError) -> Unreachable:
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        return Unreachable(f"no uffdsrv server is listening on {path}", e.errno)
    if isinstance(e, PermissionError):
        return Unreachable(f"permission denied on {path}", e.errno)
    return Unreachable(f"talking to the server on {path}: {e.strerror or e}", e.errno)


class Connection:
    """One kept connection to the server, for many requests (polling).

    Connects on the first request, and again on the next request after the
    connection was lost. Safe to share between threads: one request at a
    time goes over the socket."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        self.path, self.timeout = path, timeout
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
        except TimeoutError:
            s.close()
            raise Unreachable(f"the server on {self.path} did not accept within "
                              f"{self.timeout} s", _errno.ETIMEDOUT) from None
        except OSError as e:
            s.close()
            raise _unreachable(self.path, e) from None
        return s

    def request(self, cmd: str, **fields) -> dict:
        """Send {"cmd": cmd, **fields}; -> the server's reply object.
        Raises ControlError if the server refused, Unreachable if it did
        not answer."""
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            self._seq = self._seq % 0xFFFFFFFF + 1
            seq = self._seq
            try:
                return self._exchange(seq, {"cmd": cmd, **fields})
            except Unreachable:
                self._drop()
                raise

    def _exchange(self, seq: int, req: dict) -> dict:
        s = self._sock
        try:
            s.send(protocol.pack_ctl(protocol.CTL, seq, req))
        except TimeoutError:
            raise Unreachable(f"the server on {self.path} did not take the request within "
                              f"{self.timeout} s", _errno.ETIMEDOUT) from None
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at accept: the ERROR saying why may wait in our queue
        except OSError as e:
            raise _unreachable(self.path, e) from None
        joiner = replies.Joiner()
        while True:
            try:
                data = s.recv(protocol.MAX_MSG)
            except TimeoutError:
                raise Unreachable(f"the server on {self.path} did not answer within "
                                  f"{self.timeout} s", _errno.ETIMEDOUT) from None
            except OSError as e:
                raise _unreachable(self.path, e) from None
            if not data:
                raise Unreachable(f"the server on {self.path} closed the connection",
                                  _errno.ECONNRESET)
            try:
                mtype, got = protocol.header(data)
                if mtype == protocol.ERROR:
                    # the server drops a connection after an ERROR
                    self._drop()
                    err, text = protocol.parse_error(data)
                    raise ControlError(text, err)
                if mtype != protocol.CTL_REPLY:
                    raise protocol.ProtocolError(f"message type {mtype} on a control connection")
                if got != seq:
                    continue  # the late answer to a request that timed out
                reply = joiner.add(protocol.parse_ctl(data))
            except (protocol.ProtocolError, ValueError) as e:
                raise Unreachable(f"the server on {self.path} sent a bad reply: {e}",
                                  _errno.EPROTO) from None
            if reply is None:
                continue  # more parts of it follow
            if "error" in reply:
                raise ControlError(str(reply["error"]))
            return reply

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(path: str, cmd: str, *, timeout: float | None = 30.0, **fields) -> dict:
    """One connection, one request: {"cmd": cmd, **fields} -> the reply."""
    with Connection(path, timeout) as c:
        return c.request(cmd, **fields)


def restore(path: str, pid: int, timeout: float | None = 600.0) -> int:
    """Bring every page of pid back and stop managing it (before a debugger
    attaches, or a core dump): -> the pages brought back. Reading them
    back from swap takes as long as a reclaim, hence the long timeout."""
    return request(path, "restore", timeout=timeout, pid=pid)["restored_pages"]
