"""The daemon under many and careless peers.

* 300 small managed programs (the workload, 1 MiB, the agent preloaded):
  `uffdsrv status` must list them all, though the reply is larger than
  one message.
* A kept control socket whose process exited must not act on the process
  that gets its pid next (the pid is made to be reused at once through
  /proc/sys/kernel/ns_last_pid).
* A child forked with a raw fork syscall (no atfork handler: no beacon,
  no HELLO) is never identified; once it exits, its client and its
  references to the parent's swap slots must go."""
import array
import errno
import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time

import pytest

from uffdsrv.cli import AGENT
from uffdsrv.core import protocol as p

from ..conftest import PY, ROOT, WORKLOAD, Workload, uffdsrv, wait_client
from ..support import wait_until

PAGE = 4096
MIB = 1 << 20


def small_managed(path: str, n: int) -> list[subprocess.Popen]:
    """n real managed processes, each as small as can be: the workload with
    1 MiB it never touches, one thread, the agent preloaded (no Python in
    between); each exits when its stdin closes."""
    env = dict(os.environ, UFFDSRV_SOCKET=path, LD_PRELOAD=AGENT)
    return [subprocess.Popen([str(WORKLOAD), "--mib", "1", "--threads", "1"], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            for _ in range(n)]


def test_status_of_300_clients_is_complete(server):
    kids = []
    try:
        kids = small_managed(server.socket, 300)
        want = {k.pid for k in kids}
        wait_until(lambda: want <= {c["pid"] for c in server.status()["clients"]}, 90,
                   lambda: f"not all 300 connected: {server.log_text()[-2000:]}")
        t = time.monotonic()
        out = uffdsrv("status", "--socket", server.socket, "--json", timeout=60)
        took = time.monotonic() - t
        reply = json.loads(out.stdout)
        assert len(out.stdout) > p.MAX_MSG, "the reply fits one message: nothing tested"
        assert want <= {c["pid"] for c in reply["clients"]}
        assert took < 20, f"status took {took:.1f} s"
        # the table too, and one program's detail alone
        table = uffdsrv("status", "--socket", server.socket, timeout=60).stdout
        assert all(f"{k:>8} " in table for k in want)
        one = json.loads(uffdsrv("status", "--socket", server.socket, "--json", "--pid",
                                 str(kids[7].pid)).stdout)
        assert [c["pid"] for c in one["clients"]] == [kids[7].pid]
    finally:
        for k in kids:
            k.stdin.close()
        for k in kids:
            try:
                k.wait(20)
            except subprocess.TimeoutExpired:
                k.kill()
                k.wait()
    wait_until(lambda: not server.status()["clients"], 30, "the 300 clients never left")


def kept_socket(path: str) -> tuple[socket.socket, int]:
    """A control connection made by a child that has exited (and been
    reaped) since: SO_PEERCRED names a pid that is free."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            b.sendmsg([b"s"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [s.fileno()]))])
        finally:
            os._exit(0)
    b.close()
    _, anc, _, _ = a.recvmsg(1, socket.CMSG_SPACE(4))
    a.close()
    os.waitpid(pid, 0)
    fd = array.array("i", anc[0][2][:4])[0]
    return socket.socket(fileno=fd), pid


def workload_on_pid(path: str, pid: int) -> Workload | None:
    """A managed workload started with the pid `pid`, or None if another
    process on the machine took the number first."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    w = Workload(path, mib=8, threads=1)
    if w.pid == pid:
        return w
    w.close()
    return None


@pytest.mark.parametrize("accepted", ["while the peer lives", "after its pid is reused"])
def test_a_kept_socket_of_a_dead_peer_cannot_act_on_its_pid_reused(server, accepted):
    """The server accepts the dead peer's connection while it lives, or
    (the server stopped meanwhile) only once another process has its pid:
    then no pidfd may be taken by the number."""
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("cannot choose the next pid (/proc/sys/kernel/ns_last_pid)")
    late = accepted.startswith("after")
    for _ in range(20):
        if late:
            os.kill(server.pid, signal.SIGSTOP)  # connections wait in the backlog
        try:
            s, dead = kept_socket(server.socket)
            if late:  # once the workload has forked; its HELLO queues behind
                threading.Timer(1.0, os.kill, (server.pid, signal.SIGCONT)).start()
            w = workload_on_pid(server.socket, dead)
        finally:
            if late:
                os.kill(server.pid, signal.SIGCONT)
        if w is not None:
            break
        s.close()
    else:
        pytest.skip("another process took the freed pid 20 times")
    try:
        wait_client(server, w.pid)
        assert w.cmd("fill 1") == "ok"
        managed = wait_until(lambda: server.client(w.pid)["managed_bytes"] >= 8 * MIB, 10)
        assert managed
        s.settimeout(10)
        # the dead peer's socket names pid `dead`, which is the workload now
        s.send(p.pack(p.UNREGISTER, 3, p.REGION_BODY.pack(w.addr, w.npages * PAGE)))
        reply = s.recv(p.MAX_MSG)
        assert p.header(reply)[0] == p.ERROR, p.header(reply)
        assert p.parse_error(reply)[0] == errno.ESRCH, p.parse_error(reply)
        assert server.client(w.pid)["managed_bytes"] >= 8 * MIB
        assert server.reclaim(w.pid) >= 7 * MIB
        assert w.verify() == (w.npages, 0)
    finally:
        s.close()
        w.close()


RAW_FORK = textwrap.dedent("""
    import ctypes, hashlib, mmap, os, sys, time
    PAGE = 4096
    n = int(sys.argv[1])
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        buf[i * PAGE:(i + 1) * PAGE] = hashlib.sha256(b"%d" % i).digest() * (PAGE // 32)
    print("ready", os.getpid(), flush=True)
    for line in sys.stdin:
        if line.strip() == "fork":
            pid = ctypes.CDLL(None).syscall(57)  # fork(2) itself: no atfork handlers
            if pid == 0:
                time.sleep(0.5)
                os._exit(0)
            os.waitpid(pid, 0)
            print("forked", pid, flush=True)
        elif line.strip() == "verify":
            bad = sum(buf[i * PAGE:(i + 1) * PAGE]
                      != hashlib.sha256(b"%d" % i).digest() * (PAGE // 32) for i in range(n))
            print("ok", bad, flush=True)
        else:
            break
""")


def test_an_unidentified_fork_child_is_released_when_it_exits(server, tmp_path):
    if os.uname().machine != "x86_64":
        pytest.skip("the raw fork is syscall 57 on x86-64 only")
    prog = tmp_path / "rawfork.py"
    prog.write_text(RAW_FORK)
    npages = 2048
    proc = subprocess.Popen([PY, "-m", "uffdsrv", "run", "--socket", server.socket, "--", PY,
                             str(prog), str(npages)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        pid = int(ready[1])
        wait_client(server, pid)
        assert server.reclaim(pid) >= npages * PAGE // 2
        swapped = server.client(pid)["swapped_bytes"]
        proc.stdin.write("fork\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split()[0] == "forked"
        # the child is gone: its client must go, and it held the slots too
        wait_until(lambda: server.status().get("unidentified", 1) == 0, 10,
                   lambda: f"the raw fork's child is still a client: {server.status()}")
        proc.stdin.write("verify\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["ok", "0"]
        assert server.status()["swap"]["used_bytes"] <= swapped
    finally:
        proc.stdin.close()
        proc.wait(10)
    wait_until(lambda: server.status()["swap"]["used_bytes"] == 0, 10,
               lambda: f"slots pinned after every process exited: {server.status()}")
    assert "an unidentified child of pid" in server.log_text()


OWN_UFFD = textwrap.dedent("""
    import ctypes, mmap, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from uffdsrv.system import uffd
    buf = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fd = uffd.open_uffd()
    uffd.api(fd, 0)
    uffd.register(fd, addr, 4 << 20, uffd.REGISTER_MODE_MISSING)  # its own, not ours
    print("ready", os.getpid(), hex(addr), flush=True)
    sys.stdin.readline()
""")


def test_a_program_with_its_own_userfaultfd_is_not_a_warning_every_second(server, tmp_path):
    """Its mapping is registered with its own uffd, so ours gets EBUSY on
    every rescan (once a second): one line says so, not one a second."""
    prog = tmp_path / "own.py"
    prog.write_text(OWN_UFFD)
    proc = subprocess.Popen([PY, "-m", "uffdsrv", "run", "--socket", server.socket, "--", PY,
                             str(prog), str(ROOT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        wait_client(server, int(ready[1]))
        time.sleep(4.5)  # four rescans or more
        lines = [ln for ln in server.log_text().splitlines()
                 if ready[2][2:] in ln and "WARNING" in ln]
        assert 1 <= len(lines) <= 2, lines
    finally:
        proc.stdin.close()
        proc.wait(10)
