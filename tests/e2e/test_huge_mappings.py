"""Reserved address space far larger than memory (a sanitizer's shadow is
~15 TiB, NORESERVE) is left alone, with one log line: its page map alone
would cost gigabytes and its pagemap read would block the loop for
seconds. The program's ordinary memory is still managed, the server stays
responsive, and the program runs on after a stop."""
import subprocess
import sys
import time

from uffdsrv import ctl

from ..conftest import ROOT, wait_client
from ..support import wait_until

MIB = 1 << 20
PROGRAM = r"""
import mmap, sys
huge = mmap.mmap(-1, 1 << 40, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
for off in range(0, 1 << 40, 1 << 36):
    huge[off] = 7                      # a few pages of it used, as a shadow is
buf = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, len(buf), 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")
print("ready", flush=True)
sys.stdin.readline()
bad = sum(buf[off:off + 8] != off.to_bytes(8, "little") for off in range(0, len(buf), 4096))
bad += sum(huge[off] != 7 for off in range(0, 1 << 40, 1 << 36))
print("bad", bad, flush=True)
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_a_terabyte_of_reserved_space_is_left_alone(server):
    p = subprocess.Popen([sys.executable, "-m", "uffdsrv", "run", "--socket", server.socket,
                          "--", sys.executable, "-c", PROGRAM], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "ready"
        wait_client(server, p.pid)
        wait_until(lambda: "not managing" in server.log_text(), timeout=15,
                   message="no log line for the huge mapping")
        c = server.client(p.pid)
        assert c["managed_bytes"] < 8 << 30, c  # not the terabyte
        t0 = time.monotonic()
        ctl.request(server.socket, "status", timeout=5)
        assert time.monotonic() - t0 < 1
        assert server.reclaim(p.pid) >= 15 * MIB  # the ordinary memory is managed
        assert rss_mib(server.pid) < 1024
        assert server.log_text().count("not managing") == 1  # once, not every rescan
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
    finally:
        p.kill()
        p.wait()
