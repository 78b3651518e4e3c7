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
