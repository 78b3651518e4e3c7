"""Locked memory is not reclaimed, and reclaim says so truthfully (issue 11,
"Locked memory"). The kernel refuses MADV_DONTNEED on an mlocked mapping
(EINVAL), so the server must leave such ranges alone: a `reclaim` reports
only what its zap really dropped, swap usage matches the swapped pages,
no zap fails, and every byte reads back. A range unlocked again is managed
and reclaimed again."""
import textwrap

import pytest

from ..conftest import PY, Workload, wait_client
from ..support import wait_until

MIB = 1 << 20

# A Python program under the agent: a private anonymous mapping it fills
# with a pattern per page and generation, mlocks and munlocks parts of (in
# MiB), and verifies; one command a line, one answer a line.
PROGRAM = textwrap.dedent("""
    import ctypes, mmap, sys
    MIB, PAGE = 1 << 20, 4096
    size = int(sys.argv[1]) * MIB
    libc = ctypes.CDLL(None, use_errno=True)
    for f in (libc.mlock, libc.munlock):
        f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    gen = 0

    def page(g, i):
        return ((g << 32) | i).to_bytes(8, "little") * (PAGE // 8)

    def fill(g):
        for i in range(size // PAGE):
            m[i * PAGE:(i + 1) * PAGE] = page(g, i)

    def lock(fn, a, b):
        if fn(base + a * MIB, (b - a) * MIB) != 0:
            return "err " + str(ctypes.get_errno())
        return "ok"

    fill(gen)
    if len(sys.argv) > 2:  # locked from the start: never managed
        lock(libc.mlock, *map(int, sys.argv[2].split("-")))
    print("ready", hex(base), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "fill":
            gen = int(args[0])
            fill(gen)
            out = "ok"
        elif cmd in ("lock", "unlock"):
            out = lock(libc.mlock if cmd == "lock" else libc.munlock, *map(int, args))
        elif cmd == "verify":
            bad = sum(m[i * PAGE:(i + 1) * PAGE] != page(gen, i) for i in range(size // PAGE))
            out = "ok %d %d" % (size // PAGE, bad)
        else:
            break
        print(out, flush=True)
""")


class Locker(Workload):
    """The program above under the agent, spoken to as a Workload."""

    def __init__(self, server, tmp_path, mib: int, locked_from_start: str | None = None):
        prog = tmp_path / "locker.py"
        prog.write_text(PROGRAM)
        args = [PY, str(prog), str(mib)] + ([locked_from_start] if locked_from_start else [])
        self.addr = int(self._spawn(server.socket, args)[1], 16)
        self.npages = mib * MIB // 4096


@pytest.fixture
def locker(server, tmp_path):
    made = []

    def make(mib: int, locked_from_start: str | None = None) -> Locker:
        p = Locker(server, tmp_path, mib, locked_from_start)
        made.append(p)
        wait_client(server, p.pid)
        return p
    yield make
    for p in made:
        p.close()


def swap_matches(server) -> bool:
    st = server.status()
    return st["swap"]["used_bytes"] == sum(c["swapped_bytes"] for c in st["clients"])


def mapping_managed(server, p: Locker, mib: int) -> bool:
    return server.client(p.pid)["managed_bytes"] >= mib * MIB


def test_memory_locked_after_it_was_managed_is_not_reclaimed(server, locker):
    p = locker(32)
    wait_until(lambda: mapping_managed(server, p, 32), message="the mapping was never managed")
    managed = server.client(p.pid)["managed_bytes"]
    assert p.cmd("lock 0 8") == "ok"
    got = server.reclaim(p.pid)
    c = server.client(p.pid)
    # the locked 8 MiB are no longer managed, and nothing of them was counted
    assert c["managed_bytes"] <= managed - 8 * MIB, c
    assert got <= c["managed_bytes"], (got, c)
    assert got >= 20 * MIB, got  # the unlocked 24 MiB went (less what Python touched since)
    assert c["swapped_bytes"] <= got and got - c["swapped_bytes"] < 2 * MIB, (got, c)
    assert swap_matches(server), server.status()
    assert p.verify() == (p.npages, 0)
    # a second pass writes nothing to swap for the locked part either
    again = server.reclaim(p.pid)
    assert again <= server.client(p.pid)["managed_bytes"]
    log = server.log_text()
    assert "zap for pid" not in log, log  # no zap was refused
    assert "is locked in memory" in log, log
    assert p.verify() == (p.npages, 0)
    # unlocked, it is managed again at the next rescan, and reclaimed
    assert p.cmd("unlock 0 8") == "ok"
    wait_until(lambda: mapping_managed(server, p, 32),
               message="the unlocked range was never managed again")
    assert server.reclaim(p.pid) >= 6 * MIB
    assert server.client(p.pid)["swapped_bytes"] >= 28 * MIB
    assert swap_matches(server), server.status()
    assert p.verify() == (p.npages, 0)


def test_memory_locked_from_the_start_is_never_managed(server, locker):
    p = locker(32, locked_from_start="8-16")
    wait_until(lambda: mapping_managed(server, p, 24),
               message="the unlocked part was never managed")
    got = server.reclaim(p.pid)
    c = server.client(p.pid)
    assert got <= c["managed_bytes"] and c["swapped_bytes"] <= got, (got, c)
    assert got - c["swapped_bytes"] < 2 * MIB, (got, c)
    assert swap_matches(server), server.status()
    assert "zap for pid" not in server.log_text(), server.log_text()
    assert p.cmd("fill 3") == "ok"  # the locked part written while unmanaged, the rest faulted in
    assert p.verify() == (p.npages, 0)
