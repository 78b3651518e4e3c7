"""The swap I/O mode is told where an operator looks: `status --json`,
the start-up log line and the metrics; and a swap file on a filesystem
that refuses O_DIRECT (tmpfs) still works, in its named fallback."""
import json
import urllib.request

from ..conftest import Server, uffdsrv
from .test_observability import free_port

MIB = 1 << 20


def test_io_mode_in_status_log_and_metrics(need_kernel, tmp_path):
    port = free_port()
    s = Server(tmp_path, swap_size="64M", extra=["--metrics-addr", f"127.0.0.1:{port}"]).start()
    try:
        st = json.loads(uffdsrv("status", "--socket", s.socket, "--json").stdout)
        assert st["swap"]["io_mode"] == "direct"  # ext4 takes O_DIRECT
        assert "io direct" in s.log_text()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'uffdsrv_swap_io_mode{mode="direct"} 1.0' in text
    finally:
        assert s.stop() == 0, s.log_text()


def test_tmpfs_swap_file_names_its_fallback_and_keeps_every_page(need_kernel, tmp_path):
    import tempfile

    from ..conftest import Workload, wait_client
    from ..support import wait_until
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        s = Server(tmp_path, swap_size="64M", swap=f"{shm}/swap").start()
        w = None
        try:
            mode = s.status()["swap"]["io_mode"]
            assert mode in ("dontcache", "buffered"), mode
            w = Workload(s.socket, mib=16, threads=1)
            wait_client(s, w.pid)
            w.cmd("fill 1")
            wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 16 * MIB)
            assert s.reclaim(w.pid) >= 15 * MIB
            assert w.verify() == (w.npages, 0)
        finally:
            if w is not None:
                w.close()
            assert s.stop() == 0, s.log_text()


def test_an_unreadable_slot_ends_in_sigbus_not_wrong_bytes_or_a_hang(server, workload):
    """The kernel's own swap sends SIGBUS to a process whose swapped page
    cannot be read; so does the server (UFFDIO_POISON where the kernel has
    it, else the signal), after a few tries, and it says which page of
    which pid. Here the swap file loses its blocks under the server: every
    read comes back short."""
    import os
    import signal
    import time

    from ..support import wait_until
    w = workload(mib=8, threads=1)
    w.cmd("fill 1")
    wait_until(lambda: server.client(w.pid)["managed_bytes"] >= 8 * MIB)
    assert server.reclaim(w.pid) >= 7 * MIB
    os.truncate(server.swap, 0)
    w.proc.stdin.write("verify\n")
    w.proc.stdin.flush()
    t0 = time.monotonic()
    assert w.proc.wait(30) == -signal.SIGBUS
    assert time.monotonic() - t0 < 10
    log = server.log_text()
    assert f"pid {w.pid}: the swap slot of page 0x" in log, log
    server.status()  # the server goes on
