"""One client's trouble is its own: a program that is stopped (SIGSTOP, a
frozen cgroup, a debugger) while it is being reclaimed answers its zap
only when it runs again; meanwhile every other program is reclaimed and
served as usual."""
import os
import signal
import threading

import pytest

from uffdsrv import ctl

from ..support import wait_until

MIB = 1 << 20


def test_stopped_programs_do_not_stall_reclaim_of_others(server, workload):
    stopped = [workload(mib=24, threads=1, seed=s) for s in (1, 2)]
    running = workload(mib=24, threads=1, seed=3)
    for w in (*stopped, running):
        w.cmd("fill 1")
        wait_until(lambda w=w: server.client(w.pid)["managed_bytes"] >= 24 * MIB)
    results = {}

    def reclaim(w):
        results[w.pid] = ctl.request(server.socket, "reclaim", pid=w.pid, keep_bytes=0,
                                     timeout=120)["reclaimed_bytes"]
    for w in stopped:
        os.kill(w.pid, signal.SIGSTOP)
    threads = [threading.Thread(target=reclaim, args=(w,)) for w in stopped]
    try:
        for t in threads:
            t.start()
        # both stopped programs have a batch whose zap waits on them
        wait_until(lambda: all(server.client(w.pid)["resident_bytes"] < 24 * MIB
                               or not t.is_alive() for w, t in zip(stopped, threads)),
                   message="the stopped programs' reclaims never started")
        got = ctl.request(server.socket, "reclaim", pid=running.pid, keep_bytes=0, timeout=20)
        assert got["reclaimed_bytes"] >= 20 * MIB
        assert running.verify() == (running.npages, 0)
    finally:
        for w in stopped:
            os.kill(w.pid, signal.SIGCONT)
        for t in threads:
            t.join(60)
    for w in stopped:
        assert results[w.pid] >= 20 * MIB
        assert w.verify() == (w.npages, 0)


def test_many_connections_leave_fds_for_a_forked_child(need_kernel, tmp_path):
    """A server started with the default soft limit of 1024 open files, and
    1,100 connections from one peer: a managed program's fork() still
    completes (the kernel must be able to hand the server the child's uffd)
    and the child reads every page right."""
    import resource
    import socket

    from ..conftest import Server, Workload, wait_client

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the hard open-file limit is {hard}: too low to run this")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        s = Server(tmp_path).start()  # inherits the soft limit of 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    conns, w = [], None
    try:
        w = Workload(s.socket, mib=16, threads=1)
        wait_client(s, w.pid)
        w.cmd("fill 1")
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 16 * MIB)
        assert s.reclaim(w.pid) > 0
        for _ in range(1100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(s.socket)
            conns.append(c)
        answer = []
        t = threading.Thread(target=lambda: answer.append(w.cmd("fork")), daemon=True)
        t.start()
        t.join(30)
        assert answer, "fork() of a managed program never returned"
        forked = w.proc.stdout.readline().split()
        assert forked[:2] == ["forked", "0"], forked  # the child verified every page
    finally:
        for c in conns:
            c.close()
        if w is not None:
            w.close()
        assert s.stop() == 0, s.log_text()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_fd_whose_close_blocks_does_not_freeze_the_server(server):
    """A peer sends, with a request that takes no fds, a TCP socket whose
    close blocks (SO_LINGER with unsent data: close() waits until the data
    is gone or the linger time is up, like a FUSE file whose FLUSH is never
    answered). The server refuses the message and closes the fd, but never
    on its event loop: it keeps answering."""
    import array
    import socket
    import struct
    import time

    from uffdsrv.core import protocol

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    tcp = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()  # never reads
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tcp.setblocking(False)
    try:
        while True:
            tcp.send(b"x" * 65536)
    except BlockingIOError:
        pass  # the peer's window is shut: what is queued stays unsent
    tcp.setblocking(True)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 30))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        c.connect(server.socket)
        c.sendmsg([protocol.pack_ctl(protocol.CTL, 1, {"cmd": "status"})],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [tcp.fileno()]))])
        tcp.close()  # the server holds the last reference now
        c.settimeout(10)
        assert protocol.header(c.recv(protocol.MAX_MSG))[0] == protocol.ERROR
        t0 = time.monotonic()
        ctl.request(server.socket, "status", timeout=5)
        assert time.monotonic() - t0 < 5
    finally:
        c.close()
        peer.close()  # unread data: a reset, which ends the linger
        listener.close()
