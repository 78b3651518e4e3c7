"""The compressed RAM tier end to end: a real server with --ram-tier, real
managed programs whose pages are like a heap's (text-like records, zero
pages, same-filled pages, random bytes), the real kernel.

The tier is a write-through cache of the swap file keyed by slot
(server/swap.py): every page is on the file before it enters the pool, a
fault on a page in the pool is served from memory, a miss reads the file.
So every test here checks every byte, and what each says about the pool
is read from the server's status and /metrics: where the fault-ins came
from (hits, and the swap file's read bytes), what was refused, evicted or
dropped, and how much memory the pool holds.

The program is a Python one using the explicit API (only its buffer is
managed, so the counts are the buffer's): each page's bytes are a pure
function of (kind, index, generation), and `verify` compares them all."""
import os
import re
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from uffdsrv.core.pages import PAGE
from uffdsrv.core.slots import Slots
from uffdsrv.server.swap import TierSlots, ram_tier_size

from ..conftest import ROOT, Server, kernel_missing, wait_client
from ..support import wait_until

MIB = 1 << 20
NPAGES = 4096  # 16 MiB a program

PROGRAM = r'''
import mmap, os, random, struct, sys
from uffdsrv import client

PAGE = 4096
sock, npages = sys.argv[1], int(sys.argv[2])
buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")


def text(i, gen):
    # records as a heap holds them: keys, small numbers, repeated words
    out, j = [], 0
    while sum(map(len, out)) < PAGE:
        n = i * 64 + j
        out.append(f'{{"id": {n}, "user": "{NAMES[(n * 7 + gen) % 8]}{n % 97}", '
                   f'"gen": {gen}, "score": {(n * 31 + gen) % 1000 / 10}, '
                   f'"tags": ["t{n % 5}", "t{(n + gen) % 11}"]}}\n')
        j += 1
    return "".join(out).encode()[:PAGE]


def page(kind, i, gen):
    if kind == "text":
        return text(i, gen)
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":  # one 8-byte word, repeated: same-filled, not zero
        return struct.pack("<Q", (i * 0x9E3779B97F4A7C15 + gen) % (1 << 64) | 1) * (PAGE // 8)
    if kind == "5a":
        return b"\x5a" * PAGE
    return random.Random(i * 1000003 + gen).randbytes(PAGE)


def kind(mode, i):
    if mode == "mixed":
        return ("text", "zero", "same", "random")[i % 4]
    return mode


state = [None] * npages  # (kind, gen) per page; None: zeros


def fill(mode, gen, lo=0, hi=npages):
    for i in range(lo, hi):
        k = kind(mode, i)
        buf[i * PAGE:(i + 1) * PAGE] = page(k, i, gen)
        state[i] = (k, gen)


def check():
    return sum(buf[i * PAGE:(i + 1) * PAGE] != (bytes(PAGE) if s is None else page(s[0], i, s[1]))
               for i, s in enumerate(state))


fill("mixed", 1)
if not client.start(sock):
    print("unmanaged", client.status(), flush=True)
    sys.exit(1)
client.register(buf)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "fill":  # fill MODE GEN [LO HI]
        fill(args[0], int(args[1]), *map(int, args[2:4]))
        print("ok", flush=True)
    elif cmd == "dontneed":  # pages [LO, HI) become zeros, as free() makes them
        lo, hi = int(args[0]), int(args[1])
        buf.madvise(mmap.MADV_DONTNEED, lo * PAGE, (hi - lo) * PAGE)
        for i in range(lo, hi):
            state[i] = None
        print("ok", flush=True)
    elif cmd == "register":  # again, with a new server (a stop unregistered it)
        client.register(buf)
        print("ok", flush=True)
    elif cmd == "fork":  # the child checks every page (they share the parent's slots)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(w, str(check()).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 64).decode()
        os.waitpid(child, 0)
        print("ok", got or "died", flush=True)
    elif cmd == "verify":
        print("ok", npages, check(), flush=True)
    elif cmd == "exit":
        break
'''


class Program:
    """PROGRAM under the explicit API: one command line in, one answer out."""

    def __init__(self, server: Server, path, npages: int = NPAGES):
        self.npages = npages
        self.proc = subprocess.Popen([sys.executable, str(path), server.socket, str(npages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline().split()
        assert line == ["ready"], (line, self.proc.stderr.read() if not line else "")
        self.pid = self.proc.pid
        wait_client(server, self.pid)
        wait_until(lambda: server.client(self.pid)["managed_bytes"] >= npages * PAGE,
                   message="the buffer was never registered")

    def cmd(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline().split()
        assert out and out[0] == "ok", (line, out, self.proc.stderr.read() if not out else "")
        return out

    def verify(self) -> tuple[int, int]:
        _, n, bad = self.cmd("verify")
        return int(n), int(bad)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tier_server(tmp, cap: str = "32M", codec: str = "lz4", swap_size: str = "64M") -> Server:
    port = free_port()
    s = Server(tmp, swap_size=swap_size, extra=["--ram-tier", cap, "--ram-tier-codec", codec,
                                                "--metrics-addr", f"127.0.0.1:{port}"])
    s.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return s.start()


def scrape(s: Server, name: str, **labels) -> float:
    """One sample of /metrics (the sum over series that match labels)."""
    text = urllib.request.urlopen(s.metrics_url, timeout=10).read().decode()
    total, found = 0.0, False
    for m in re.finditer(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[1] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(m[2]), True
    assert found, f"{name}{labels} is not exposed"
    return total


def tier(s: Server) -> dict:
    t = s.status()["tier"]
    assert t is not None, "the server has no ram tier"
    return t


@pytest.fixture
def program_file(tmp_path):
    why = kernel_missing()
    if why:
        pytest.skip(why)
    path = tmp_path / "tier_program.py"
    path.write_text(PROGRAM)
    return path


@pytest.fixture
def served(program_file, tmp_path):
    """A tiered server and what a test starts on it, stopped whatever happens."""
    made: dict = {"programs": [], "servers": []}

    def server(**kw) -> Server:
        s = tier_server(tmp_path, **kw)
        made["servers"].append(s)
        return s

    def program(s: Server, npages: int = NPAGES) -> Program:
        p = Program(s, program_file, npages)
        made["programs"].append(p)
        return p
    yield server, program
    for p in made["programs"]:
        p.close()
    for s in made["servers"]:
        if s.poll() is None:
            code = s.stop()
            assert code == 0, s.log_text()
        assert "Traceback" not in s.log_text(), s.log_text()


# --- without root: the pieces the server builds the tier from ------------------------
def test_ram_tier_sizes_and_shares():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert ram_tier_size("256M") == 256 * MIB
    assert ram_tier_size("0") == 0
    share = ram_tier_size("25%")
    assert share % PAGE == 0 and abs(share - total // 4) < PAGE
    for bad in ("1K", "100%", "-5%", "x%", "abc", f"{2 * total}"):
        with pytest.raises(ValueError):
            ram_tier_size(bad)


def test_a_slot_freed_in_python_drops_its_entry():
    class Pool:
        def __init__(self):
            self.dropped: list[int] = []

        def drop(self, slots):
            self.dropped += np.asarray(slots).tolist()
    pool, plain = Pool(), Slots(64)
    slots = TierSlots.adopt(plain, pool)
    assert slots.refs is plain.refs and slots.counters is plain.counters  # the engine's arrays
    got = slots.alloc(4)
    slots.ref(got[:2])  # a forked child shares the first two
    slots.release(got)
    assert pool.dropped == got[2:].tolist()  # only slots whose count reached 0
    slots.release(int(got[0]))
    assert pool.dropped == [*got[2:].tolist(), int(got[0])]
    assert slots.used == 1


# --- end to end ----------------------------------------------------------------
def test_tier_from_the_config_file_and_mistakes_get_one_line(program_file, tmp_path):
    from ..conftest import uffdsrv
    conf = tmp_path / "uffdsrv.toml"
    conf.write_text('ram_tier = "16M"\nram_tier_codec = "zstd"\n\n'
                    '[[client]]\ncomm = "nothing-here"\nbudget = "1G"\n')
    s = Server(tmp_path, swap_size="64M", extra=["--config", str(conf)]).start()
    try:
        t = tier(s)
        assert (t["cap_bytes"], t["codec"]) == (16 * MIB, "zstd"), t
    finally:
        assert s.stop() == 0, s.log_text()
    # the command line wins over the file
    s = Server(tmp_path, swap_size="64M", extra=["--config", str(conf), "--ram-tier", "0"])
    try:
        assert s.start().status()["tier"] is None
    finally:
        assert s.stop() == 0, s.log_text()
    swap = str(tmp_path / "swap")
    for args, needle in ((["--ram-tier", "12%x"], "not a size"),
                         (["--ram-tier", "100%"], "0% to 100%"),
                         (["--ram-tier", "8K"], "too small"),
                         (["--ram-tier-codec", "lzo"], "invalid choice"),
                         (["--ram-tier", "64K", "--swap-size", "64M"], "index")):
        r = uffdsrv("serve", "--socket", str(tmp_path / "s.sock"), "--swap", swap, *args,
                    check=False, timeout=60)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for text, needle in (('ram_tier = "lots"\n', "ram_tier: not a size"),
                         ('ram_tier_codec = "lzo"\n', "lz4 or zstd")):
        conf.write_text(text)
        r = uffdsrv("serve", "--socket", str(tmp_path / "s.sock"), "--swap", swap,
                    "--config", str(conf), check=False, timeout=60)
        assert r.returncode == 2 and needle in r.stderr, (text, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_round_trip_of_mixed_pages_is_served_from_the_pool(served, codec):
    server, program = served
    s = server(codec=codec)
    assert f"ram tier 32 MiB {codec}" in s.log_text()
    assert tier(s)["codec"] == codec
    p = program(s)
    assert s.reclaim(p.pid) >= NPAGES // 4 * 3 * PAGE * 0.9  # the zero pages need no slot
    t = tier(s)
    per_kind = NPAGES // 4
    # text and same-filled pages are in the pool; random ones were refused
    assert t["stored_pages"] >= 2 * per_kind * 0.95, t
    assert t["same_pages"] >= per_kind * 0.95, t
    assert t["rejected_pages"] >= per_kind * 0.95, t
    assert t["compression_ratio"] and t["compression_ratio"] > 1, t
    assert s.status()["memory_saved_bytes"] == s.status()["swap"]["used_bytes"] - \
        tier(s)["pool_bytes"]
    assert scrape(s, "uffdsrv_swapped_pages", tier="ram") == t["stored_pages"]
    read0 = scrape(s, "uffdsrv_swap_read_bytes_total")
    assert p.verify() == (NPAGES, 0)
    after = tier(s)
    hits = after["hits"] - t["hits"]
    assert hits >= 2 * per_kind * 0.95, after
    # what came from the device is the refused pages, not the pool's
    wait_until(lambda: scrape(s, "uffdsrv_swap_read_bytes_total") - read0
               >= t["rejected_pages"] * PAGE, message="the refused pages were not read")
    read = int(scrape(s, "uffdsrv_swap_read_bytes_total") - read0)
    assert read <= (t["rejected_pages"] + 64) * PAGE, (read, t)
    assert after["stored_pages"] == 0, "slots freed by fault-ins kept their entries"
    assert scrape(s, "uffdsrv_ram_tier_lookups_total", result="hit") == after["hits"]
    print(f"\n{codec} pool: {t['stored_pages']} pages ({t['same_pages']} same-filled) in "
          f"{t['pool_bytes'] >> 10} KiB, ratio {t['compression_ratio']:.2f}; fault-in: "
          f"{hits} hits, {read // PAGE} pages read, {after['hit_ns'] / max(hits, 1):.0f} ns/hit")


def test_incompressible_pages_go_to_disk_only(served):
    server, program = served
    s = server()
    p = program(s)
    p.cmd("fill random 2")
    s.reclaim(p.pid)
    t = tier(s)
    assert t["stored_pages"] == 0 and t["rejected_pages"] >= NPAGES, t
    read0 = scrape(s, "uffdsrv_swap_read_bytes_total")
    assert p.verify() == (NPAGES, 0)
    assert tier(s)["hits"] == 0
    # (the engine's counters reach /metrics on its next tick)
    wait_until(lambda: scrape(s, "uffdsrv_swap_read_bytes_total") - read0 >= NPAGES * PAGE,
               message="the refused pages were not read from the swap file")


def test_same_filled_pages_are_one_value_each(served):
    server, program = served
    s = server()
    p = program(s)
    empty = tier(s)["pool_bytes"]  # the slot index only
    p.cmd("fill 5a 2")
    assert s.reclaim(p.pid) >= NPAGES * PAGE * 0.95
    t = tier(s)
    assert t["same_pages"] >= NPAGES * 0.95 and t["stored_pages"] == t["same_pages"], t
    # 16 MiB of 0x5A take (almost) nothing beyond the index
    assert t["pool_bytes"] - empty <= 64 << 10, (t, empty)
    assert t["stored_bytes"] <= 8 * t["stored_pages"], t
    assert p.verify() == (NPAGES, 0)
    assert tier(s)["hits"] - t["hits"] >= NPAGES * 0.95


def test_writeback_under_a_full_pool_evicts_and_loses_nothing(served):
    server, program = served
    s = server(cap="2M")  # about 1.6 MiB of arena beside the index: a fraction of the data
    p = program(s)
    p.cmd("fill text 2")
    for gen in (3, 4):
        s.reclaim(p.pid)
        t = tier(s)
        assert t["evicted_pages"] > 0, t
        assert t["pool_bytes"] <= t["cap_bytes"] == 2 * MIB, t
        assert 0 < t["stored_pages"] < NPAGES, t
        assert p.verify() == (NPAGES, 0)
        after = tier(s)
        assert after["hits"] > t["hits"] and after["misses"] > t["misses"], after
        assert scrape(s, "uffdsrv_ram_tier_evicted_pages_total") == after["evicted_pages"]
        p.cmd(f"fill text {gen}")


def test_graceful_stop_then_a_new_server_serves_every_page(served, tmp_path):
    server, program = served
    s = server()
    p = program(s)
    s.reclaim(p.pid)
    assert tier(s)["stored_pages"] > 0
    assert s.stop() == 0, s.log_text()  # puts every page back: from the pool or the file
    assert p.verify() == (NPAGES, 0)  # unmanaged now
    s2 = server()
    wait_client(s2, p.pid, timeout=20)  # the agent says HELLO again by itself
    p.cmd("register")
    wait_until(lambda: s2.client(p.pid)["managed_bytes"] >= NPAGES * PAGE)
    p.cmd("fill mixed 3")
    s2.reclaim(p.pid)
    assert tier(s2)["stored_pages"] > 0
    assert p.verify() == (NPAGES, 0)


def test_kill9_with_pages_in_the_pool_loses_nothing(served):
    server, program = served
    s = server()
    p = program(s)
    s.reclaim(p.pid)
    t = tier(s)
    assert t["stored_pages"] >= NPAGES // 2 * 0.95, t
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    s2 = server()  # the same directory: its journal and swap file
    assert "took over 1 of 1" in s2.log_text(), s2.log_text()
    assert tier(s2)["stored_pages"] == 0  # the dead server's pool is gone...
    assert p.verify() == (NPAGES, 0)  # ...and every page was on the file
    assert tier(s2)["misses"] > 0
    p.cmd("fill mixed 2")  # the new server manages it fully, pool and all
    s2.reclaim(p.pid)
    assert tier(s2)["stored_pages"] > 0
    assert p.verify() == (NPAGES, 0)


def test_a_reused_slot_never_hands_back_old_bytes(served):
    """Compressible pages go to the pool under their slots; faulted back in,
    the slots are freed; the program writes random bytes (which the pool
    refuses) and is reclaimed again onto the same slots (lowest first).
    A stale entry would hand back the first generation's text."""
    server, program = served
    s = server()
    p = program(s)
    p.cmd("fill text 1")
    s.reclaim(p.pid)
    assert tier(s)["stored_pages"] >= NPAGES * 0.95
    assert p.verify() == (NPAGES, 0)
    assert tier(s)["stored_pages"] == 0
    p.cmd("fill random 2")
    s.reclaim(p.pid)
    t = tier(s)
    assert t["stored_pages"] == 0 and t["rejected_pages"] >= NPAGES, t
    hits0 = t["hits"]
    assert p.verify() == (NPAGES, 0)
    assert tier(s)["hits"] == hits0
    # a slot freed in Python (the program's own DONTNEED of swapped pages)
    # drops its entry too, then its reuse by a refused page reads right
    p.cmd("fill text 3")
    s.reclaim(p.pid)
    before = tier(s)
    half = NPAGES // 2
    p.cmd(f"dontneed 0 {half}")
    after = tier(s)
    assert after["stored_pages"] <= before["stored_pages"] - half * 0.95, (before, after)
    assert after["dropped_pages"] >= before["dropped_pages"] + half * 0.95
    p.cmd(f"fill random 4 0 {half}")
    s.reclaim(p.pid)
    assert p.verify() == (NPAGES, 0)


def test_a_forked_child_shares_the_pool_with_its_parent(served):
    """A child shares its parent's reclaimed slots: whichever faults a page
    in first leaves the entry for the other (the slot's count is still 1),
    and the last one's fault frees the slot and drops the entry."""
    server, program = served
    s = server()
    p = program(s)
    s.reclaim(p.pid)
    t = tier(s)
    assert t["stored_pages"] >= NPAGES // 2 * 0.95, t
    assert p.cmd("fork") == ["ok", "0"]  # the child read every page right
    mid = tier(s)
    assert mid["hits"] - t["hits"] >= t["stored_pages"] * 0.95, mid
    assert mid["stored_pages"] == t["stored_pages"], "the child's fault-ins dropped shared entries"
    assert p.verify() == (NPAGES, 0)
    end = tier(s)
    assert end["hits"] - mid["hits"] >= t["stored_pages"] * 0.95, end
    wait_until(lambda: tier(s)["stored_pages"] == 0, message="entries outlived their slots")
