"""The server dies (kill -9) at any moment under load; a new one started
with the same swap file and state directory takes every program over from
the journal, and every page reads back exactly. While no server runs,
faults on reclaimed pages wait; nothing reads as zeros."""
import random
import signal
import subprocess
import time

from ..conftest import PY, ROOT, Server, Workload, wait_client
from ..support import background, wait_until

MIB = 1 << 20


def kill9(s: Server) -> None:
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()


def restart(s: Server) -> Server:
    n = Server(s.dir)
    return n.start()


def test_faults_wait_for_the_next_server_and_read_exact_bytes(need_kernel, tmp_path):
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=64)
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        s.reclaim(w.pid)
        assert s.client(w.pid)["swapped_bytes"] > 60 * MIB
        kill9(s)
        t, out = background(w.verify)
        t.join(1.0)
        assert t.is_alive(), f"verify finished without a server: {out}"
        s = restart(s)
        t.join(60)
        assert not t.is_alive(), "verify still waits after the new server started"
        assert out.get("value") == (w.npages, 0), out
        assert "took over 1 of 1" in s.log_text(), s.log_text()
        # the new server manages it fully: reclaim, rewrite, read again
        w.cmd("write 2 3")
        s.reclaim(w.pid)
        assert s.client(w.pid)["swapped_bytes"] > 60 * MIB
        assert w.verify() == (w.npages, 0)
    finally:
        w.close()
        s.stop()


def test_kill9_mid_reclaim_and_mid_faultin_loses_nothing(need_kernel, tmp_path):
    rnd = random.Random(7)
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=64, threads=4)
    restarts = 0
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        gen = 1
        for round_ in range(6):
            if round_ % 2 == 0:   # die while reclaiming
                t, out = background(lambda sock=s.socket: subprocess.run(
                    [PY, "-m", "uffdsrv", "reclaim", "--socket", sock, "--pid", str(w.pid)],
                    capture_output=True, cwd=ROOT, timeout=120))
                time.sleep(rnd.uniform(0.0, 0.25))
                kill9(s)
                t.join(30)
                s = restart(s)
                restarts += 1
            else:                 # die while faulting back in and writing
                s.reclaim(w.pid)
                gen += 1
                t, out = background(lambda g=gen: w.cmd(f"write {g} 2"))
                time.sleep(rnd.uniform(0.0, 0.1))
                kill9(s)
                s = restart(s)
                restarts += 1
                t.join(60)
                assert out.get("value") == "ok", out
            assert w.verify() == (w.npages, 0), f"round {round_}"
        s.reclaim(w.pid)
        assert w.verify() == (w.npages, 0)
        print(f"\n{restarts} kill -9 restarts survived, {7 * w.npages} pages verified")
    finally:
        w.close()
        s.stop()


def test_a_killed_client_frees_its_slots_and_others_do_not_notice(server, workload):
    a = workload(mib=32)
    b = workload(mib=32, seed=2)
    a.cmd("fill 1")
    b.cmd("fill 1")
    server.reclaim(b.pid)
    t, out = background(lambda: server.reclaim(a.pid))
    time.sleep(0.05)
    a.proc.kill()  # mid-reclaim, or just after
    a.proc.wait()
    t.join(30)
    wait_until(lambda: server.status()["swap"]["used_bytes"]
               == server.client(b.pid)["swapped_bytes"],
               message=lambda: f"the killed program's slots are still used: {server.status()}")
    assert b.verify() == (b.npages, 0)
