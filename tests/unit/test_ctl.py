"""The control-socket client (uffdsrv/ctl.py) against a fake server on a
SOCK_SEQPACKET socket in a temp dir: replies, both kinds of refusal, every
way of not being reached, a kept connection, and the Python client's
limit() raising on a refusal. No root, no native build."""
import errno
import os
import socket
import threading

import pytest

from uffdsrv import client, ctl
from uffdsrv.core import protocol as p


class FakeServer:
    """Answers each CTL with handler(request) -> reply bytes or None (no
    answer); counts the connections it accepted."""

    def __init__(self, path: str, handler):
        self.path, self.handler = path, handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(8)
        self.accepted, self.requests = 0, []
        self.closing = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        with conn:
            while True:
                try:
                    data = conn.recv(p.MAX_MSG)
                except OSError:
                    return
                if not data:
                    return
                _, seq = p.header(data)
                req = p.parse_ctl(data)
                self.requests.append(req)
                out = self.handler(seq, req)
                if out == "close":
                    return
                for msg in out or ():
                    conn.send(msg)

    def close(self):
        self.closing.set()
        self.sock.close()


@pytest.fixture
def serve(tmp_path):
    made = []

    def make(handler):
        s = FakeServer(str(tmp_path / f"s{len(made)}.sock"), handler)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def reply(obj):
    return lambda seq, req: [p.pack_ctl(p.CTL_REPLY, seq, obj(req) if callable(obj) else obj)]


def test_request_sends_cmd_and_fields_and_returns_the_reply(serve):
    s = serve(reply(lambda req: {"echo": req}))
    got = ctl.request(s.path, "reclaim", pid=7, keep_bytes=0)
    assert got == {"echo": {"cmd": "reclaim", "pid": 7, "keep_bytes": 0}}


def test_error_reply_is_a_control_error_with_the_servers_text(serve):
    s = serve(reply({"error": "pid 7 is not a managed process"}))
    with pytest.raises(ctl.ControlError) as e:
        ctl.request(s.path, "reclaim", pid=7)
    assert str(e.value) == "pid 7 is not a managed process"
    assert e.value.errno is None and not isinstance(e.value, ctl.Unreachable)


def test_error_message_is_a_control_error_with_its_errno(serve):
    s = serve(lambda seq, req: [p.pack_error(seq, errno.EACCES, "uid 1 may not connect")])
    with pytest.raises(ctl.ControlError) as e:
        ctl.request(s.path, "status")
    assert (str(e.value), e.value.errno) == ("uid 1 may not connect", errno.EACCES)
    assert not isinstance(e.value, ctl.Unreachable)


def test_nothing_listening_is_unreachable(tmp_path):
    for path in (str(tmp_path / "none.sock"), "/nonexistent/dir/sock"):
        with pytest.raises(ctl.Unreachable, match="no uffdsrv server is listening on"):
            ctl.request(path, "status")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(ctl.Unreachable, match="no uffdsrv server"):
        ctl.request(str(tmp_path / "stale.sock"), "status")


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes the socket's mode")
def test_permission_denied_is_unreachable(serve):
    s = serve(reply({}))
    os.chmod(s.path, 0)
    with pytest.raises(ctl.Unreachable, match="permission denied"):
        ctl.request(s.path, "status")


def test_no_answer_in_time_is_unreachable(serve):
    s = serve(lambda seq, req: None)
    with pytest.raises(ctl.Unreachable, match="did not answer within 0.2 s") as e:
        ctl.request(s.path, "status", timeout=0.2)
    assert e.value.errno == errno.ETIMEDOUT


def test_closed_connection_is_unreachable(serve):
    s = serve(lambda seq, req: "close")
    with pytest.raises(ctl.Unreachable, match="closed the connection"):
        ctl.request(s.path, "status")


def test_a_bad_reply_is_unreachable_not_a_traceback(serve):
    s = serve(lambda seq, req: [b"not a message"])
    with pytest.raises(ctl.Unreachable, match="bad reply"):
        ctl.request(s.path, "status")


def test_connection_is_kept_across_requests(serve):
    n = iter(range(100))
    s = serve(reply(lambda req: {"n": next(n)}))
    with ctl.Connection(s.path) as c:
        assert [c.request("status")["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert s.accepted == 1


def test_connection_skips_a_late_reply_and_reconnects_after_a_loss(serve):
    calls = []

    def handler(seq, req):
        calls.append(seq)
        if req["cmd"] == "slow":
            return None  # answered late, with the next request's answer
        if req["cmd"] == "drop":
            return "close"
        return [p.pack_ctl(p.CTL_REPLY, seq - 1, {"late": True}),
                p.pack_ctl(p.CTL_REPLY, seq, {"ok": seq})]
    s = serve(handler)
    c = ctl.Connection(s.path, timeout=0.2)
    with pytest.raises(ctl.Unreachable):
        c.request("slow")
    assert s.accepted == 1
    c2 = ctl.Connection(s.path, timeout=2)
    got = c2.request("status")
    assert got == {"ok": calls[-1]}  # the reply to seq - 1 was passed over
    with pytest.raises(ctl.Unreachable, match="closed"):
        c2.request("drop")
    assert c2.request("status")["ok"] == calls[-1]  # a new connection
    c.close()
    c2.close()


def test_client_limit_raises_on_a_refusal(serve, monkeypatch):
    s = serve(lambda seq, req: [p.pack_error(seq, errno.EPERM, "not yours")]
              if req["bytes"] == 1 else [p.pack_ctl(p.CTL_REPLY, seq, {"budget_bytes": 2})])
    monkeypatch.setattr(client, "_socket_path", s.path)
    client.limit(2)
    assert s.requests[-1] == {"cmd": "limit", "pid": os.getpid(), "bytes": 2}
    with pytest.raises(OSError) as e:
        client.limit(1)
    assert e.value.errno == errno.EPERM and "not yours" in str(e.value)


def test_client_limit_raises_on_an_error_reply(serve, monkeypatch):
    s = serve(reply({"error": "limit needs bytes >= 0"}))
    monkeypatch.setattr(client, "_socket_path", s.path)
    with pytest.raises(OSError, match="limit needs bytes") as e:
        client.limit(-1)
    assert e.value.errno == errno.EINVAL


def test_cli_says_a_refusal_in_one_line_and_exits_non_zero(serve, capsys):
    from uffdsrv import cli
    s = serve(reply({"error": "pid 9 is not a managed process"}))
    assert cli.main(["reclaim", "--socket", s.path, "--pid", "9"]) == 2
    err = capsys.readouterr().err
    assert err == "uffdsrv: server: pid 9 is not a managed process\n"
    assert cli.main(["status", "--socket", s.path + ".none"]) == 2
    assert capsys.readouterr().err == f"uffdsrv: no uffdsrv server is listening on {s.path}.none\n"
