"""Reserved address space far larger than memory (a sanitizer's shadow is
~15 TiB, NORESERVE) is left alone, with one log line: its page map alone
would cost gigabytes and its pagemap read would block the loop for
seconds. The program's ordinary memory is still managed, the server stays
responsive, and the program runs on after a stop."""
import subprocess
import sys
import threading
import time

import pytest

from uffdsrv import ctl
from uffdsrv.system import kernel

from ..conftest import ROOT, Server, wait_client
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


# A sanitizer-like sparse mapping below --max-region: 16 GiB NORESERVE with a
# few MiB used, in SPOTS scattered spots of SPOT bytes each (not aligned), each
# page stamped with its offset; "more" touches as many again in parts of the
# mapping that held nothing yet.
HUGE = 16 << 30
SPOTS, SPOT = 40, 64 << 10
SPARSE_PROGRAM = r"""
import mmap, sys, ctypes
HUGE, SPOTS, SPOT = @ARGS@
huge = mmap.mmap(-1, HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
base = ctypes.addressof(ctypes.c_char.from_buffer(huge))
def spots(round_):
    stride = HUGE // SPOTS
    return [i * stride + round_ * (stride // 2) + (i + 1) * 3 * 4096 for i in range(SPOTS)]
def stamp(off):
    for p in range(off, off + SPOT, 4096):
        v = (p ^ 0x5a5a).to_bytes(8, "little")
        huge[p:p + 8] = v
        huge[p + 4088:p + 4096] = v
touched = []
for off in spots(0):
    stamp(off)
touched += spots(0)
buf = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, len(buf), 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")
print("ready", base, ",".join(map(str, touched)), flush=True)
for line in sys.stdin:
    if line.strip() == "more":
        for off in spots(1):
            stamp(off)
        touched += spots(1)
        print("more", ",".join(map(str, spots(1))), flush=True)
        continue
    bad = sum(buf[off:off + 8] != off.to_bytes(8, "little") for off in range(0, len(buf), 4096))
    for off in touched:
        for p in range(off, off + SPOT, 4096):
            v = (p ^ 0x5a5a).to_bytes(8, "little")
            bad += huge[p:p + 8] != v or huge[p + 4088:p + 4096] != v
    print("bad", bad, flush=True)
""".replace("@ARGS@", f"{HUGE}, {SPOTS}, {SPOT}")


def registered(pid: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) of pid that are registered with a userfaultfd
    (VmFlags `um`), from its smaps: what the kernel says is managed."""
    out, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if head == "VmFlags:":
                if cur and "um" in line.split()[1:] and cur[0] < hi and lo < cur[1]:
                    out.append((max(cur[0], lo), min(cur[1], hi)))
                cur = None
            elif "-" in head and not head.endswith(":"):
                a, _, b = head.partition("-")
                try:
                    cur = (int(a, 16), int(b, 16))
                except ValueError:
                    cur = None
    return out


def present_pages(pid: int, addr: int, npages: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        raw = f.read(npages * 8)
    return sum(int.from_bytes(raw[i:i + 8], "little") >> 62 != 0 for i in range(0, len(raw), 8))


def covered(ranges, s, e) -> bool:
    return any(a <= s and e <= b for a, b in ranges)


def test_a_sparse_16_gib_mapping_costs_what_it_uses(server):
    if not kernel.current().features["pagemap_scan"]:
        pytest.skip("the kernel has no PAGEMAP_SCAN (6.7+): the mapping is managed whole")
    idle = rss_mib(server.pid)
    p = subprocess.Popen([sys.executable, "-m", "uffdsrv", "run", "--socket", server.socket,
                          "--", sys.executable, "-c", SPARSE_PROGRAM], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    slow, done = [], threading.Event()

    def ping():
        # the loop answers while the rescans run
        while not done.is_set():
            t0 = time.monotonic()
            ctl.request(server.socket, "status", timeout=5)
            slow.append(time.monotonic() - t0)
            time.sleep(0.01)

    pinger = threading.Thread(target=ping, daemon=True)
    try:
        word, base, offs = p.stdout.readline().split()
        assert word == "ready"
        base, offs = int(base), [int(o) for o in offs.split(",")]
        pinger.start()
        wait_client(server, p.pid)
        wait_until(lambda: all(covered(registered(p.pid, base, base + HUGE), base + o,
                                       base + o + SPOT) for o in offs), timeout=15,
                   message="the touched spots of the huge mapping are not all registered")
        log = server.log_text()
        # (the 16 MiB buffer mapped right below it may be part of the same VMA)
        assert f"-{base + HUGE:#x} is 16 GiB" in log and "chunks" in log, log
        reg = registered(p.pid, base, base + HUGE)
        assert sum(e - s for s, e in reg) <= SPOTS * 2 * (4 << 20), reg  # chunks, not 16 GiB
        c = server.client(p.pid)
        assert SPOTS * SPOT + (16 << 20) <= c["managed_bytes"] < 1 << 30, c
        managed_rss = rss_mib(server.pid)
        assert managed_rss - idle < 20, (idle, managed_rss)

        assert server.reclaim(p.pid) >= SPOTS * SPOT + 15 * MIB
        assert sum(present_pages(p.pid, base + o, SPOT // 4096) for o in offs) == 0
        warm = rss_mib(server.pid)  # with the buffers the reclaim's I/O touched
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]

        # new parts of the mapping, touched later, are managed at a rescan
        p.stdin.write("more\n")
        p.stdin.flush()
        word, more = p.stdout.readline().split()
        assert word == "more"
        more = [int(o) for o in more.split(",")]
        wait_until(lambda: all(covered(registered(p.pid, base, base + HUGE), base + o,
                                       base + o + SPOT) for o in more), timeout=15,
                   message="spots touched later are not registered at a rescan")
        assert server.reclaim(p.pid) >= SPOTS * SPOT
        assert sum(present_pages(p.pid, base + o, SPOT // 4096) for o in more + offs) == 0
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
        assert server.log_text().count(f"-{base + HUGE:#x} is 16 GiB") == 1
        assert rss_mib(server.pid) - warm < 10, (idle, warm, rss_mib(server.pid))
        print("server RSS MiB: idle", idle, "managed", managed_rss, "after a reclaim", warm,
              "at the end", rss_mib(server.pid))
        done.set()
        pinger.join(10)
        assert slow and max(slow) < 0.1, sorted(slow)[-5:]

        # a graceful stop reclaimed: the program runs on with every byte
        assert server.reclaim(p.pid) >= SPOTS * SPOT
        assert server.stop() == 0
        assert "Traceback" not in server.log_text()
        assert registered(p.pid, base, base + HUGE) == []
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
    finally:
        done.set()
        p.kill()
        p.wait()


def test_without_pagemap_scan_a_large_mapping_is_managed_whole(need_kernel, tmp_path):
    """The fallback: a kernel without PAGEMAP_SCAN (hidden here) keeps the
    whole mapping managed, as before chunks existed; a 2 GiB one costs a
    page map of 512k pages, within bounds."""
    s = Server(tmp_path)
    s.env["UFFDSRV_KERNEL_HIDE"] = "pagemap_scan"
    s.start()
    program = r"""
import mmap, sys, ctypes
huge = mmap.mmap(-1, 2 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
for off in range(0, 2 << 30, 64 << 20):
    huge[off:off + 8] = off.to_bytes(8, "little")
print("ready", ctypes.addressof(ctypes.c_char.from_buffer(huge)), flush=True)
sys.stdin.readline()
print("bad", sum(huge[o:o + 8] != o.to_bytes(8, "little") for o in range(0, 2 << 30, 64 << 20)),
      flush=True)
"""
    p = subprocess.Popen([sys.executable, "-m", "uffdsrv", "run", "--socket", s.socket,
                          "--", sys.executable, "-c", program], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        word, base = p.stdout.readline().split()
        assert word == "ready"
        base = int(base)
        wait_until(lambda: registered(p.pid, base, base + (2 << 30)) == [(base, base + (2 << 30))],
                   timeout=15, message="the 2 GiB mapping is not registered whole")
        assert "chunks" not in s.log_text()
        assert s.reclaim(p.pid) >= 32 * 4096
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
    finally:
        p.kill()
        p.wait()
        assert s.stop() == 0


def test_a_new_server_takes_the_chunks_over_after_a_crash(need_kernel, tmp_path):
    """kill -9 with the chunks reclaimed: the journal holds each chunk as a
    region; the next server serves them and goes on managing new ones."""
    if not kernel.current().features["pagemap_scan"]:
        pytest.skip("the kernel has no PAGEMAP_SCAN (6.7+): the mapping is managed whole")
    s = Server(tmp_path).start()
    p = subprocess.Popen([sys.executable, "-m", "uffdsrv", "run", "--socket", s.socket,
                          "--", sys.executable, "-c", SPARSE_PROGRAM], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        word, base, offs = p.stdout.readline().split()
        base, offs = int(base), [int(o) for o in offs.split(",")]
        wait_until(lambda: all(covered(registered(p.pid, base, base + HUGE), base + o,
                                       base + o + SPOT) for o in offs), timeout=15,
                   message="the touched spots of the huge mapping are not all registered")
        assert s.reclaim(p.pid) >= SPOTS * SPOT
        assert sum(present_pages(p.pid, base + o, SPOT // 4096) for o in offs) == 0
        s.proc.kill()
        s.proc.wait()
        s = Server(tmp_path).start()
        wait_until(lambda: "took over" in s.log_text(), timeout=15, message="no takeover")
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
        p.stdin.write("more\n")
        p.stdin.flush()
        more = [int(o) for o in p.stdout.readline().split()[1].split(",")]
        wait_until(lambda: all(covered(registered(p.pid, base, base + HUGE), base + o,
                                       base + o + SPOT) for o in more), timeout=15,
                   message="the new server does not manage spots touched after the crash")
        assert s.reclaim(p.pid) >= 2 * SPOTS * SPOT
        assert sum(present_pages(p.pid, base + o, SPOT // 4096) for o in more + offs) == 0
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["bad", "0"]
        assert sum(e - s_ for s_, e in registered(p.pid, base, base + HUGE)) < 1 << 30
    finally:
        p.kill()
        p.wait()
        assert s.stop() == 0
        assert "Traceback" not in s.log_text(), s.log_text()
