"""Hostile input on the control socket, against a real server that manages
a real workload which must come out of it intact.

The test process is the attacker: it fuzzes the socket with hypothesis
(random, truncated and oversized messages; HELLO with bad sizes, flags,
addresses and fds; ZAP_DONE, REGISTER and CTL out of place), sends
userfaultfds that are not its to give (the managed workload's, taken with
pidfd_getfd; a forked child's), registers ranges that are not its own,
and floods the socket with connections. Every offence must cost only the
offending connection: an ERROR and a close for a protocol error, the
server up, its fd count back to where it was, the workload's pages and
status unchanged. Access control (0600, --allow-uid) is checked with
children that drop to other uids."""
import array
import ctypes
import errno
import json
import os
import random
import socket
import stat
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uffdsrv.core import protocol as p
from uffdsrv.system import proc, uffd
from uffdsrv.system.procfs import agent_uffd

from ..conftest import Server, uffdsrv

PAGE = 4096
USER_TOP = 1 << 47
FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def mmap_pages(n: int, prot: int = 3) -> int:
    """Private anonymous pages the test never touches (a page registered
    MISSING by the server would block the thread that reads it)."""
    addr = _libc.mmap(None, n * PAGE, prot, 0x22, -1, 0)  # MAP_PRIVATE|MAP_ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value)
    return addr


def mapped(addr: int, length: int = PAGE) -> bool:
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo < addr + length and addr < hi:
            return True
    return False


class Attacker:
    """Sends one message per connection and says what came back."""

    def __init__(self, path: str):
        self.path = path
        self.sent = 0

    def connect(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def send(self, s: socket.socket, data: bytes, fds=()) -> None:
        if fds:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            s.send(data)
        self.sent += 1

    def outcome(self, s: socket.socket, must_close: bool = False) -> tuple:
        """('closed',) | ('error', errno, text, closed) | ('reply', type, data)."""
        data = s.recv(p.MAX_MSG + 1)
        if not data:
            return ("closed",)
        mtype, _ = p.header(data)
        if mtype == p.ERROR:
            err, text = p.parse_error(data)
            if must_close or err == errno.EPROTO:
                closed = s.recv(p.MAX_MSG + 1) == b""  # dropped right after the ERROR
            else:  # a refused request may keep its connection: look, briefly
                closed = False
                timeout = s.gettimeout()
                s.setblocking(False)
                for _ in range(20):
                    try:
                        closed = s.recv(p.MAX_MSG + 1) == b""
                        break
                    except BlockingIOError:
                        time.sleep(0.001)
                s.settimeout(timeout)
            return ("error", err, text, closed)
        return ("reply", mtype, data)

    def one(self, data: bytes, fds=(), must_close: bool = False) -> tuple:
        s = self.connect()
        try:
            self.send(s, data, fds)
            out = self.outcome(s, must_close)
        finally:
            s.close()
        if out[0] == "error" and (out[1] == errno.EPROTO or must_close):
            assert out[3], f"not dropped after an error: {out}"
        return out

    def ctl(self, req, s: socket.socket | None = None) -> dict:
        own = s is None
        s = s or self.connect()
        try:
            self.send(s, p.pack_ctl(p.CTL, 7, req))
            out = self.outcome(s)
        finally:
            if own:
                s.close()
        assert out[0] == "reply" and out[1] == p.CTL_REPLY, out
        return p.parse_ctl(out[2])


def hello(flags=0, features=uffd.REQUIRED_FEATURES, private=(0, 0), beacon=0, seq=0) -> bytes:
    return p.pack(p.HELLO, seq, p.HELLO_BODY.pack(flags, 0, features, private[0],
                                                  private[1] - private[0], beacon))


def region(mtype, start, length, seq=3) -> bytes:
    return p.pack(mtype, seq, p.REGION_BODY.pack(start % (1 << 64), length % (1 << 64)))


def server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds(pid: int, at_most: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (n := server_fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def child_uffd(beacon: int | None = None):
    """A forked child creates a uffd (on its own mm, a copy of ours at the
    fork) and hands it over; it lives until its socket closes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            a.close()
            fd = uffd.open_uffd()
            uffd.api(fd, uffd.REQUIRED_FEATURES)
            b.sendmsg([b"u"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            b.recv(1)
        finally:
            os._exit(0)
    b.close()
    _, anc, _, _ = a.recvmsg(1, socket.CMSG_SPACE(4))
    fd = array.array("i", anc[0][2][:4])[0]
    return pid, a, fd


def as_uid(uid: int, fn) -> object:
    """Run fn() in a forked child with uid/gid dropped; returns its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                res = fn()
            except Exception as e:
                res = {"exc": type(e).__name__, "errno": getattr(e, "errno", None)}
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_hostile_control_socket(server, workload):
    w = workload(mib=16, threads=2)
    assert w.cmd("fill 1") == "ok"
    server.reclaim(w.pid)
    before = server.client(w.pid)
    assert before["swapped_bytes"] >= 15 << 20, before
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600
    spid = server.proc.pid
    me = os.getpid()
    atk = Attacker(server.socket)
    t_start = time.monotonic()

    # fds of every kind the server must not take for a uffd
    tmpf = open(server.dir / "junk", "w+b")
    pr, pw = os.pipe()
    efd = os.eventfd(0)
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    raw_uffd = uffd.open_uffd()  # never through UFFDIO_API
    weak_uffd = uffd.open_uffd()
    uffd.api(weak_uffd, 0)  # no features
    own_uffd = uffd.open_uffd()
    uffd.api(own_uffd, uffd.REQUIRED_FEATURES)
    fd_kinds = {"pipe": [pr], "file": [tmpf.fileno()], "eventfd": [efd], "socket": [sk.fileno()],
                "raw_uffd": [raw_uffd], "weak_uffd": [weak_uffd], "own_uffd": [own_uffd],
                "two": [own_uffd, pr], "many": [pr, pw, efd, pr, pw], "none": []}
    hole = PAGE  # below vm.mmap_min_addr: nothing is ever mapped there
    outcomes: dict[str, int] = {}

    def tally(kind, out):
        key = f"{kind}:{out[0]}" + (f":{errno.errorcode.get(out[1], out[1])}"
                                    if out[0] == "error" else "")
        outcomes[key] = outcomes.get(key, 0) + 1

    # --- 1. random bytes, 0..70000 long (past UFS_MAX_MSG: truncated) -------------
    @FUZZ
    @given(st.one_of(st.binary(max_size=64),
                     st.tuples(st.integers(0, 70000), st.integers(0, 2**32)).map(
                         lambda t: random.Random(t[1]).randbytes(t[0]))))
    def random_bytes(data):
        out = atk.one(data)
        tally("random", out)
        # nothing random is a valid message: the peer is dropped
        assert out[0] == "closed" or (out[0] == "error" and out[1] == errno.EPROTO), out
    random_bytes()

    # --- 2. valid headers, any type and seq, garbage or truncated bodies ----------
    bodies = {p.HELLO: p.HELLO_BODY.size, p.ZAP_DONE: p.ZAP_DONE_BODY.size,
              p.REGISTER: p.REGION_BODY.size, p.UNREGISTER: p.REGION_BODY.size}

    @FUZZ
    @given(st.one_of(st.integers(0, 15), st.integers(0, 0xFFFF)), st.integers(0, 2**64 - 1),
           st.one_of(st.binary(max_size=80), st.integers(0, 70000).map(lambda n: b"\xff" * n)),
           st.booleans())
    def headers(mtype, seq, body, exact):
        if exact and mtype in bodies:  # right size, garbage fields
            body = (body + b"\x01" * 64)[:bodies[mtype]]
        elif mtype in bodies and len(body) == bodies[mtype]:
            body = body[:-1]  # truncated
        if mtype == p.CTL:
            body = b"\x80" + body  # never valid UTF-8 JSON
        is_region = mtype in (p.REGISTER, p.UNREGISTER)
        out = atk.one(p.pack(mtype, seq, body), must_close=not is_region)
        tally("header", out)
        if is_region and out[0] == "error" and out[1] != errno.EPROTO:
            return  # well-formed region: refused, the test is no agent
        if mtype == p.HELLO:  # garbage that parses: "no forked child known", ...
            assert out[0] == "error" and out[3], out
            return
        if mtype in (p.DEVICE, p.FORK_PREPARE) and not body:
            # well-formed: the device (for an allowed peer), or OK (nothing of
            # an unmanaged pid is swapped); the device came and was dropped
            assert out[0] == "reply" and out[1] == p.OK, (mtype, out)
            return
        assert out[0] == "error" and out[1] == errno.EPROTO, (mtype, out)
    headers()

    # --- 3. HELLO: sizes, flags, addresses, fds ------------------------------------
    addrs = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2**35).map(lambda n: n * PAGE),
                      st.sampled_from([0, PAGE - 1, USER_TOP, USER_TOP - PAGE, 2**64 - PAGE,
                                       w.addr, w.addr + 17]))

    valid = st.sampled_from([0, 2, 4, 6, 1])  # mostly well-formed, to get past the parser
    aligned = st.integers(0, 2**35).map(lambda n: n * PAGE)

    @FUZZ
    @given(valid | valid | st.integers(0, 2**32 - 1),
           st.just(uffd.REQUIRED_FEATURES) | st.integers(0, 2**64 - 1),
           aligned | addrs, aligned | addrs, aligned | st.just(hole) | addrs,
           st.sampled_from(sorted(fd_kinds)),
           st.just(0) | st.just(0) | st.integers(-56, 40))
    def hellos(flags, features, pstart, plen, beacon, fdkind, resize):
        fds = fd_kinds[fdkind]
        if fdkind == "own_uffd" and beacon < USER_TOP and mapped(beacon):
            beacon = hole  # our own uffd on our own mapped page would be accepted
        msg = p.pack(p.HELLO, 1, p.HELLO_BODY.pack(flags, 0, features, pstart,
                                                   plen, beacon))
        msg = msg[:len(msg) + resize] if resize < 0 else msg + b"\0" * resize
        out = atk.one(msg, fds, must_close=True)
        tally(f"hello-{fdkind}", out)
        # a forked child nobody knows, a refused uffd: ERROR and dropped
        # (an empty datagram reads as end of file: dropped without a word)
        assert (out[0] == "error" and out[3]) or (out == ("closed",) and not msg), out
    hellos()

    # --- 4. ZAP_DONE from a connection that is no agent -------------------------------
    for seq in (0, 1, 2**64 - 1):
        out = atk.one(p.pack(p.ZAP_DONE, seq, p.ZAP_DONE_BODY.pack(4096, 1, 0)))
        assert out[0] == "error" and out[1] == errno.EPROTO, out

    # --- 5. REGISTER/UNREGISTER of ranges that are not ours --------------------------
    ranges = st.sampled_from([(w.addr, w.npages * PAGE), (w.addr + PAGE, PAGE), (w.addr, 0),
                              (w.addr + 1, PAGE), (USER_TOP, PAGE), (USER_TOP - PAGE, 2 * PAGE),
                              (2**64 - PAGE, PAGE), (0, PAGE), (PAGE, 2**64 - PAGE)]) | \
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))

    @FUZZ
    @given(st.sampled_from([p.REGISTER, p.UNREGISTER]),
           ranges | st.tuples(aligned, aligned), st.booleans())
    def regions(mtype, rng, with_fd):
        out = atk.one(region(mtype, *rng), [pr] if with_fd else [])
        tally("region", out)
        assert out[0] == "error", out
        if out[1] != errno.EPROTO:  # well-formed: refused, we have no agent
            assert not with_fd and "no agent" in out[2], out
    regions()

    # --- 6. CTL: non-JSON, arrays, nesting, huge ints, unknown commands --------------
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20)
    pids = st.sampled_from([w.pid, me, 1, 0, -1, spid, 2**31, 2**63, 10**30, True]) | \
        st.integers() | json_values

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=200).map(lambda b: ("raw", b)),
        st.integers(1, 60000).map(lambda n: ("raw", b"[" * n + b"]" * n)),
        st.integers(4301, 30000).map(lambda n: ("raw", b'{"cmd":"reclaim","pid":' +
                                                b"9" * n + b"}")),
        json_values.map(lambda v: ("obj", v)),
        st.fixed_dictionaries({"cmd": st.sampled_from(["reclaim", "status", "limit", "x", ""]) |
                               json_values},
                              optional={"pid": pids, "keep_bytes": pids, "bytes": pids}).map(
            lambda d: ("obj", d))))
    def ctls(item):
        kind, v = item
        body = v if kind == "raw" else json.dumps(v).encode()
        if kind == "obj" and isinstance(v, dict) and v.get("cmd") == "limit":
            v = {**v, "pid": 1}  # as root we may; the workload's budget must stay
            body = json.dumps(v).encode()
        if len(body) + p.HDR.size > p.MAX_MSG:
            body = body[:p.MAX_MSG - p.HDR.size]
        out = atk.one(p.pack(p.CTL, 5, body))
        tally("ctl", out)
        if out[0] == "reply":
            assert out[1] == p.CTL_REPLY
            p.parse_ctl(out[2])
        else:
            assert out[0] == "error" and out[1] == errno.EPROTO, out
    ctls()
    fuzz_s = time.monotonic() - t_start

    # --- 7. someone else's userfaultfd -------------------------------------------------
    private = mmap_pages(3)  # as the agent's: the beacon inside its private mapping
    beacon = private + PAGE
    # the managed workload's own uffd, taken the way an attacker with
    # ptrace rights would: it is another client's context, refused
    holder, num = agent_uffd(w.pid)  # in the agent's zap helper's fd table
    pidfd = proc.pidfd_open(holder)
    wl_uffd = proc.pidfd_getfd(pidfd, num, holder)
    out = atk.one(hello(private=(private, private + 3 * PAGE), beacon=beacon), [wl_uffd])
    assert out[0] == "error" and out[1] == errno.EBUSY and out[3], out
    out = atk.one(hello(flags=p.HELLO_RECONNECT, private=(private, private + 3 * PAGE),
                        beacon=w.addr), [wl_uffd])
    assert out[0] == "error" and out[1] == errno.EBUSY and out[3], out
    os.close(wl_uffd)
    os.close(pidfd)
    # a forked child's uffd: it acts on the child's mm (the same layout as
    # ours, so our beacon address is mapped there too): refused, and the
    # child's page is left unregistered
    cpid, keep, cfd = child_uffd()
    out = atk.one(hello(private=(private, private + 3 * PAGE), beacon=beacon), [cfd])
    assert out[0] == "error" and out[1] == errno.EPERM and out[3], out
    assert "um" not in (proc_vmflags(cpid, beacon) or set())
    # ... also when our own uffd has registered the beacon as a decoy
    uffd.register(own_uffd, beacon, PAGE, uffd.REGISTER_MODE_MISSING)
    out = atk.one(hello(private=(private, private + 3 * PAGE), beacon=beacon), [cfd])
    assert out[0] == "error" and out[1] == errno.EPERM and out[3], out
    uffd.unregister(own_uffd, beacon, PAGE)
    keep.close()
    os.close(cfd)
    os.waitpid(cpid, 0)
    atk.sent += 5

    # --- 8. our own uffd is legitimate: we become a client, but only of ourselves --------
    own2 = uffd.open_uffd()
    uffd.api(own2, uffd.REQUIRED_FEATURES)
    agent = atk.connect()
    atk.send(agent, hello(private=(private, private + 3 * PAGE), beacon=beacon), [own2])
    out = atk.outcome(agent)
    assert out[0] == "reply" and out[1] == p.HELLO_OK, out
    assert server.client(me)["managed_bytes"] == 0
    mine = mmap_pages(4)
    partial = mmap_pages(2)
    _libc.munmap(partial + PAGE, PAGE)
    ro = mmap_pages(1, prot=1)
    assert not mapped(w.addr, w.npages * PAGE), "the workload's range is mapped here too"
    api = atk.connect()
    refusals = [(w.addr, w.npages * PAGE), (w.addr + 8 * PAGE, PAGE),  # the workload's
                (private, PAGE), (beacon, PAGE),  # the agent's own mapping and beacon
                (hole, PAGE), (partial, 2 * PAGE), (ro, PAGE)]  # nothing / not all / read-only
    for start, length in refusals:
        atk.send(api, region(p.REGISTER, start, length))
        out = atk.outcome(api)
        assert out[0] == "error" and out[1] == errno.EINVAL and not out[3], (hex(start), out)
    for start, length in [(w.addr, w.npages * PAGE), (0, USER_TOP)]:  # not managed by us
        atk.send(api, region(p.UNREGISTER, start, length))
        assert atk.outcome(api)[0] == "reply"
    assert server.client(me)["managed_bytes"] == 0
    atk.send(api, region(p.REGISTER, mine, 4 * PAGE))
    assert atk.outcome(api)[:2] == ("reply", p.OK)
    assert server.client(me)["managed_bytes"] == 4 * PAGE
    atk.send(api, region(p.UNREGISTER, mine, 4 * PAGE))
    assert atk.outcome(api)[:2] == ("reply", p.OK)
    assert server.client(me)["managed_bytes"] == 0
    atk.send(api, region(p.REGISTER, USER_TOP - PAGE, 2 * PAGE))  # kernel space: dropped
    out = atk.outcome(api)
    assert out[0] == "error" and out[1] == errno.EPROTO and out[3], out
    api.close()
    # a second HELLO on the agent connection is a protocol error
    atk.send(agent, hello(private=(private, private + 3 * PAGE), beacon=beacon), [own2])
    out = atk.outcome(agent)
    assert out[0] == "error" and out[1] == errno.EPROTO and out[3], out
    agent.close()
    os.close(own2)

    # --- 9. a flood of connections ---------------------------------------------------------
    base = server_fds(spid)
    half = hello()[:30]
    slowest = 0.0
    flood = 0
    for _ in range(10):
        socks = []
        for i in range(200):
            s = atk.connect()
            if i % 3 == 1:
                s.send(half)
                atk.sent += 1
            elif i % 3 == 2:
                s.send(p.pack_ctl(p.CTL, i, {"cmd": "status"}))
                atk.sent += 1
            socks.append(s)
        flood += len(socks)
        t0 = time.monotonic()
        st_ = json.loads(uffdsrv("status", "--socket", server.socket, "--json",
                                 timeout=10).stdout)
        slowest = max(slowest, time.monotonic() - t0)
        assert any(c["pid"] == w.pid for c in st_["clients"])
        for s in socks:
            s.close()
    assert slowest < 5, f"status took {slowest:.2f} s during the flood"
    after = wait_fds(spid, base)
    assert after <= base, f"server fds {base} -> {after} after the flood"

    # --- the server is up, the workload untouched ---------------------------------------------
    assert server.proc.poll() is None
    now = server.client(w.pid)
    for k in ("managed_bytes", "swapped_bytes", "resident_bytes", "faults_total"):
        assert now[k] == before[k], (k, before, now)
    assert w.verify() == (w.npages, 0)
    c = server.client(w.pid)
    assert c["swapped_bytes"] == 0 and c["managed_bytes"] == before["managed_bytes"]
    assert server.reclaim(w.pid) >= 15 << 20
    assert w.verify() == (w.npages, 0)
    log = server.log_text()
    assert "Traceback" not in log and "dropping the peer" not in log, log[-3000:]
    for fd in (pr, pw, efd, raw_uffd, weak_uffd, own_uffd):
        os.close(fd)
    sk.close()
    tmpf.close()
    print(f"\n{atk.sent} hostile messages tried ({flood} flood connections), "
          f"fuzz {fuzz_s:.1f} s, slowest status in the flood {slowest * 1000:.0f} ms")
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))


def proc_vmflags(pid: int, addr: int):
    from uffdsrv.system import ident
    return ident.vmflags_at(pid, addr)


def test_socket_access_by_uid(need_kernel):
    """0600 by default; --allow-uid opens it to one more uid, whose peers
    may act only on themselves; any other uid is told and dropped."""
    d = Path(tempfile.mkdtemp(prefix="uffdsrv-acl-", dir="/tmp"))
    os.chmod(d, 0o755)
    default = Server(d / "a", swap_size="64M")
    (d / "a").mkdir()
    default.start()
    open_ = Server(d / "b", swap_size="64M", extra=["--allow-uid", "65534"])
    (d / "b").mkdir()
    try:
        assert stat.S_IMODE(os.stat(default.socket).st_mode) == 0o600
        os.chmod(d / "a", 0o755)

        def status_of(path):
            def fn():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(5)
                s.connect(path)
                try:
                    s.send(p.pack_ctl(p.CTL, 1, {"cmd": "status"}))
                except OSError:
                    pass  # refused at accept: the ERROR waits in our queue
                data = s.recv(p.MAX_MSG)
                if not data:
                    return {"closed": True}
                mtype, _ = p.header(data)
                if mtype == p.ERROR:
                    err, text = p.parse_error(data)
                    return {"error": err, "text": text, "closed": s.recv(100) == b""}
                return p.parse_ctl(data)
            return fn
        assert as_uid(65534, status_of(default.socket)) == {"exc": "PermissionError",
                                                            "errno": errno.EACCES}
        open_.start()
        os.chmod(d / "b", 0o755)
        assert stat.S_IMODE(os.stat(open_.socket).st_mode) == 0o666
        got = as_uid(65533, status_of(open_.socket))  # the file lets it in, the server not
        assert got["error"] == errno.EACCES and got["closed"], got
        got = as_uid(65534, status_of(open_.socket))
        assert got["clients"] == [] and "swap" in got, got

        def reclaim_other():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            s.connect(open_.socket)
            s.send(p.pack_ctl(p.CTL, 1, {"cmd": "reclaim", "pid": 1}))
            return p.parse_ctl(s.recv(p.MAX_MSG))
        got = as_uid(65534, reclaim_other)
        assert "its own pid" in got["error"], got
        assert open_.status()["clients"] == []  # root still sees everything
    finally:
        for s in (default, open_):
            assert s.stop() == 0
            assert "Traceback" not in s.log_text(), s.log_text()
