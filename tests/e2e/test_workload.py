"""End to end: a real multi-threaded workload under the agent, a real
server, the real kernel. Every page carries a pattern derived from its
index and generation; `verify` checks all of them."""
import threading
import time

import pytest

from ..conftest import uffdsrv
from ..support import wait_until

MIB = 1 << 20


def test_reclaim_256mib_and_verify_every_page(server, workload):
    w = workload(mib=256, threads=4)
    assert w.cmd("fill 1") == "ok"
    rss_full = w.rss_kib()
    t0 = time.monotonic()
    reclaimed = server.reclaim(w.pid)
    reclaim_s = time.monotonic() - t0
    c = server.client(w.pid)
    assert c["swapped_bytes"] >= 0.9 * 256 * MIB, c
    assert reclaimed >= 0.9 * 256 * MIB
    assert w.rss_kib() < rss_full - 200 * 1024, "reclaimed memory is still resident"
    t0 = time.monotonic()
    assert w.verify() == (w.npages, 0)
    fault_s = time.monotonic() - t0
    assert server.client(w.pid)["swapped_bytes"] == 0
    # rewrite a third of the pages, reclaim again over a reused swap file
    assert w.cmd("write 2 3") == "ok"
    t0 = time.monotonic()
    server.reclaim(w.pid)
    reclaim2_s = time.monotonic() - t0
    assert server.client(w.pid)["swapped_bytes"] >= 0.9 * 256 * MIB
    assert w.verify() == (w.npages, 0)
    pages = 256 * MIB // 4096
    print(f"\nreclaim {pages / reclaim_s:,.0f} pages/s (fresh file), "
          f"{pages / reclaim2_s:,.0f} pages/s (reused); "
          f"fault-in {pages / fault_s:,.0f} pages/s (4 threads, sequential)")


def test_partial_reclaim_keeps_budget(server, workload):
    w = workload(mib=64)
    w.cmd("fill 1")
    server.reclaim(w.pid, keep=16 * MIB)
    c = server.client(w.pid)
    assert c["resident_bytes"] <= 16 * MIB
    assert c["swapped_bytes"] >= 40 * MIB
    assert w.verify() == (w.npages, 0)


def test_fork_child_sees_reclaimed_pages(server, workload):
    w = workload(mib=64)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    child_line = w.cmd("fork")
    forked = w.proc.stdout.readline().split()
    assert child_line == f"ok {w.npages} 0", child_line
    assert forked[0] == "forked" and forked[1] == "0", forked
    # the parent still reads its own pages, and the child's exit freed
    # only its references: the parent's slots are intact
    assert w.verify() == (w.npages, 0)


def test_fork_then_both_sides_reclaimed_and_written(server, workload):
    """Slots shared by parent and child: the parent rewrites and is
    reclaimed again while a child verifies the old generation."""
    w = workload(mib=32)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    w.cmd("write 2 2")
    server.reclaim(w.pid)
    assert w.cmd("fork") == f"ok {w.npages} 0"
    assert w.proc.stdout.readline().split()[:2] == ["forked", "0"]
    w.cmd("write 3 5")
    server.reclaim(w.pid)
    assert w.verify() == (w.npages, 0)
    wait_until(lambda: server.status()["swap"]["used_bytes"]
               <= server.client(w.pid)["swapped_bytes"],
               message="the child's exit did not free its slots")


def test_program_dontneed_reads_zeros_not_stale_swap(server, workload):
    w = workload(mib=32)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    used = server.status()["swap"]["used_bytes"]
    assert w.cmd("dontneed 100 1100") == "ok"  # reclaimed pages: must read zeros
    assert server.status()["swap"]["used_bytes"] <= used - 1000 * 4096
    assert w.cmd("dontneed 2000 2100") == "ok"
    assert w.verify() == (w.npages, 0)
    # resident now: the program's DONTNEED on resident pages, then reclaim
    assert w.cmd("dontneed 3000 3500") == "ok"
    server.reclaim(w.pid)
    assert w.verify() == (w.npages, 0)


def test_munmap_and_mremap_of_reclaimed_pages(server, workload):
    w = workload(mib=32)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    used = server.status()["swap"]["used_bytes"]
    assert w.cmd("munmap 100 600") == "ok"
    assert server.status()["swap"]["used_bytes"] <= used - 500 * 4096
    assert w.cmd("mremap 1000 1500").startswith("ok ")
    assert w.verify() == (w.npages - 500, 0)
    # the moved pages are managed at their new place: reclaim and read again
    server.reclaim(w.pid)
    assert w.verify() == (w.npages - 500, 0)


def test_writes_racing_reclaim_are_never_lost(server, workload):
    """Reclaim runs again and again while every thread keeps rewriting
    pages; a write let through while its page is in flight shows up as a
    bad page."""
    w = workload(mib=32, threads=4)
    w.cmd("fill 1")
    stop = threading.Event()
    rounds = []

    def reclaimer():
        while not stop.is_set():
            server.reclaim(w.pid)
            rounds.append(1)
    t = threading.Thread(target=reclaimer)
    t.start()
    try:
        for gen in range(2, 30):
            assert w.cmd(f"write {gen} {1 + gen % 3}") == "ok"
    finally:
        stop.set()
        t.join()
    assert len(rounds) >= 3
    assert w.verify() == (w.npages, 0)
    server.reclaim(w.pid)
    assert w.verify() == (w.npages, 0)


def test_exit_frees_every_slot(server, workload):
    w = workload(mib=32)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    assert server.status()["swap"]["used_bytes"] >= 30 * MIB
    w.close()
    wait_until(lambda: server.status()["swap"]["used_bytes"] == 0,
               message=lambda: f"slots still used: {server.status()}")
    assert all(c["pid"] != w.pid for c in server.status()["clients"])


def test_swap_full_stops_reclaim_and_loses_nothing(need_kernel, tmp_path):
    from ..conftest import Server, Workload, wait_client
    s = Server(tmp_path, swap_size="8M").start()
    try:
        w = Workload(s.socket, mib=32)
        wait_client(s, w.pid)
        w.cmd("fill 1")
        reclaimed = s.reclaim(w.pid)
        assert 7 * MIB <= reclaimed <= 8 * MIB
        assert s.status()["swap"]["used_bytes"] == 8 * MIB
        assert w.verify() == (w.npages, 0)
        w.close()
    finally:
        assert s.stop() == 0
    assert "is full" in s.log_text()


def test_graceful_stop_puts_every_page_back(need_kernel, tmp_path):
    from ..conftest import Server, Workload, wait_client
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=64)
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        s.reclaim(w.pid)
        assert s.client(w.pid)["swapped_bytes"] > 60 * MIB
        assert s.stop() == 0
        assert "16384 pages put back" in s.log_text() or "pages put back" in s.log_text()
        # no server now: the program runs unmanaged with all its data
        assert w.verify() == (w.npages, 0)
        assert w.cmd("write 2 2") == "ok"
        assert w.verify() == (w.npages, 0)
    finally:
        w.close()
        s.stop()


def test_program_runs_unmanaged_without_server(tmp_path):
    from ..conftest import Workload
    w = Workload(str(tmp_path / "nothing-here.sock"), mib=8)
    try:
        w.cmd("fill 1")
        assert w.verify() == (w.npages, 0)
    finally:
        w.close()
    err = w.proc.stderr.read()
    assert err.count("\n") == 1 and "running unmanaged" in err, err


@pytest.mark.parametrize("args, needle", [
    (["status", "--socket", "/nonexistent/sock"], "no uffdsrv server"),
    (["reclaim", "--socket", "/nonexistent/sock", "--pid", "1"], "no uffdsrv server"),
    (["reclaim", "--socket", "/x", "--pid", "-3"], "not a positive integer"),
    (["serve", "--socket", "/tmp/x.sock", "--swap", "/tmp/x", "--swap-size", "lots"],
     "not a size"),
    (["serve", "--socket", "/tmp/x.sock", "--swap", "/nonexistent/dir/swap"],
     "cannot open swap file"),
    (["run", "--socket", "/x"], "no command"),
    (["bogus"], "invalid choice"),
])
def test_user_mistakes_get_one_line_and_nonzero_exit(args, needle):
    r = uffdsrv(*args, check=False, timeout=30)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_reclaim_of_unknown_pid_is_an_error(server):
    r = uffdsrv("reclaim", "--socket", server.socket, "--pid", "999999", check=False)
    assert r.returncode != 0 and "not a managed process" in r.stderr


def test_reclaim_of_a_sparse_heap_steps_over_swapped_and_empty_pages(server, workload):
    """After a reclaim, every third page is written (faulted back); the next
    reclaim protects and zaps across the swapped pages in between, and the
    program's own DONTNEEDs leave empty holes to step over as well. The
    pages stepped over must come back exactly."""
    w = workload(mib=16)
    w.cmd("fill 1")
    server.reclaim(w.pid)
    w.cmd("write 2 3")
    w.cmd("dontneed 1000 1100")
    used = server.status()["swap"]["used_bytes"]
    server.reclaim(w.pid)
    c = server.client(w.pid)
    assert c["resident_bytes"] == 0, c
    assert server.status()["swap"]["used_bytes"] > used
    assert w.verify() == (w.npages, 0)
