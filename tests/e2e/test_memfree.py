"""Memory reclaimed is memory the machine gets back: after `uffdsrv reclaim`
of a 256 MiB workload returns, free memory has grown by about what was
reclaimed, the page cache has not taken it instead, the swap file has
(almost) no page in the cache, and every page then reads back right.

Through the page cache this failed by a mile: reclaiming 512 MiB raised
MemFree by 60 MiB (0.12) and grew Cached by 526 MiB (1.03); 256 MiB here
gave MemFree -0.17 and Cached +1.12 of the bytes reclaimed.

The bounds, derived: ideally free memory grows by 1.0x and Cached by 0x. The
server's own growth while it reclaims (page-map arrays, the journal's few
KiB written through the cache, Python heap) is a few MiB; the rest of the
slack is for the machine's other activity over the seconds the test runs
(2 CPUs shared with other test runs: a process starting or exiting moves
free memory by tens of MiB). 0.7 leaves 77 MiB of that and 0.2 leaves 51 MiB,
while the page-cache behaviour stays at least 0.5 away from either bound.
Free memory is sampled for up to 5 s and its best gain taken: a RWF_DONTCACHE
write drops its pages when writeback completes, just after the write.

"Free" here is MemFree plus the pages on the per-CPU free lists. Since
Linux 6.7 the kernel tunes those lists up after a burst of frees (here up
to high_max = 48,307 pages, 188 MiB, per CPU) and drains them back into
the buddy allocator, which is all MemFree counts, at about 8 MiB/s here.
Measured after reclaiming 256 MiB: MemFree +0.21..0.35 at once and +0.41..
0.51 after 5 s, MemFree + per-CPU lists +0.99..1.00 at once. Those pages are
free (the next allocation on that CPU takes them); MemFree alone cannot
show it within 5 s.

Free memory is the whole machine's, so a neighbour that allocates while we
watch can hide what we freed: the round is run again (fault all back,
fill, reclaim) up to ATTEMPTS times, and one round must meet both bounds.
What cannot be noise is checked every round: the swap file's own pages
in the cache (mincore) stay near 0, which the page-cache path fails
every time (65,601 of 65,536 reclaimed pages cached)."""
import os
import time

import pytest

from uffdsrv.core.pages import PAGE
from uffdsrv.system import swapdev

from ..conftest import Server, Workload, wait_client

MIB = 1 << 20
WORKLOAD_MIB = 256
FREE_MIN = 0.7      # of the bytes reclaimed, within 5 s
CACHED_MAX = 0.2
SETTLE = 5.0
ATTEMPTS = 3  # rounds; free memory must hold its bound in one of them


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def pcp_free() -> int:
    """Bytes on the per-CPU free lists: the `count:` of each pageset in
    /proc/zoneinfo."""
    n = 0
    with open("/proc/zoneinfo") as f:
        for line in f:
            line = line.strip()
            if line.startswith("count:"):
                n += int(line.split()[1])
    return n * PAGE


def free_bytes() -> tuple[int, int, int]:
    """(MemFree + per-CPU free lists, MemFree, Cached) now."""
    m = meminfo()
    return m["MemFree"] + pcp_free(), m["MemFree"], m["Cached"]


def swap_cached_pages(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return swapdev.cached_pages(fd)
    finally:
        os.close(fd)


@pytest.fixture
def small_server(need_kernel, tmp_path):
    # twice the workload: no test run allocates gigabytes of swap file
    s = Server(tmp_path, swap_size=f"{2 * WORKLOAD_MIB}M").start()
    yield s
    code = s.stop()
    log = s.log_text()
    assert "Traceback" not in log, log
    assert code == 0, log


def test_reclaim_gives_memory_back_to_the_machine(small_server):
    s = small_server
    fd = os.open(s.swap, os.O_RDONLY | os.O_CLOEXEC)
    try:
        memfs = swapdev.memory_fs(fd)
    finally:
        os.close(fd)
    if memfs:
        pytest.skip(f"the swap file is on {memfs}, which is memory: nothing can be freed")
    mode = s.status()["swap"].get("io_mode")
    w = Workload(s.socket, mib=WORKLOAD_MIB, threads=2)
    rounds = []
    try:
        wait_client(s, w.pid)
        for attempt in range(ATTEMPTS):
            w.cmd(f"fill {attempt + 7}")
            time.sleep(0.5)  # let the fill's page-table and allocator work settle
            got, free, memfree, cached = reclaim_and_watch(s, w.pid)
            swap_pages = swap_cached_pages(s.swap)
            rounds.append(f"io_mode {mode}: reclaimed {got / MIB:.0f} MiB, free {free / MIB:+.0f} "
                          f"MiB ({free / got:.2f}; MemFree alone {memfree / got:.2f}), Cached "
                          f"{cached / MIB:+.0f} MiB ({cached / got:.2f}), swap file pages "
                          f"cached {swap_pages}")
            print(rounds[-1])
            # the swap file itself is never in the cache: no noise in this one
            assert swap_pages <= got // PAGE // 100, rounds
            # every page comes back right, read from the device, not the cache
            assert w.verify() == (w.npages, 0)
            assert swap_cached_pages(s.swap) <= got // PAGE // 100, rounds
            if free >= FREE_MIN * got and cached <= CACHED_MAX * got:
                break
        else:
            raise AssertionError(f"free memory or Cached out of bounds in every round: {rounds}")
    finally:
        w.close()


def reclaim_and_watch(s: Server, pid: int) -> tuple[int, int, int, int]:
    """Reclaim everything; then (bytes reclaimed, best gain of free memory
    within SETTLE seconds, MemFree's gain and Cached's growth then)."""
    free0, memfree0, cached0 = free_bytes()
    got = s.reclaim(pid)
    assert got >= 0.9 * WORKLOAD_MIB * MIB, got
    best = None
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        free, memfree, cached = free_bytes()
        if best is None or free - free0 > best[0]:
            best = (free - free0, memfree - memfree0, cached - cached0)
        if best[0] >= got and best[2] <= 0.05 * got:
            break
        time.sleep(0.05)
    return (got, *best)
