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
