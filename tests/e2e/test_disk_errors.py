"""A failing disk, for real: the swap file is served by a FUSE filesystem
(faultyfs.c beside this file) that fails the reads or writes a test asks
for with EIO, as a dying disk does. The kernel here has no device-mapper,
NBD or ublk; FUSE is how a test gets an I/O error from a real file.

* A failed write cancels its batch: nothing is zapped, nothing lost, the
  error is in the log and the metrics, and reclaim works again once the
  disk does.
* A read that keeps failing ends the fault in SIGBUS, as the kernel's own
  swap does: never wrong bytes, never a wait for ever, and the server goes
  on serving everyone else.
* A read that fails once or twice is tried again and serves the right
  bytes.

Which slot holds which page is read from the backing file itself: every
page of the workload holds a pattern that is a function of its index,
generation and seed (native/tools/workload.c), so the first word of a
slot names its page."""
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from uffdsrv.core.pages import PAGE

from ..conftest import Server, Workload, wait_client
from ..support import wait_until
from .test_observability import free_port

MIB = 1 << 20
SOURCE = Path(__file__).with_name("faultyfs.c")
SWAP_READ_TRIES = 3  # server/faults.py: reads of an unreadable slot before SIGBUS
BOTH_MODES = pytest.mark.parametrize("faulty", ["direct", "cached"], indirect=True)


@pytest.fixture(scope="session")
def faultyfs_bin(tmp_path_factory) -> str:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse (the fuse module is not loaded)")
    for tool in ("gcc", "pkg-config"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: cannot build the FUSE test filesystem")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True)
    if flags.returncode:
        pytest.skip(f"fuse3 is missing (libfuse3-dev): {flags.stderr.strip()}")
    out = tmp_path_factory.mktemp("faultyfs") / "faultyfs"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(SOURCE),
                        *flags.stdout.split()], capture_output=True, text=True)
    assert r.returncode == 0, f"faultyfs.c does not compile: {r.stderr}"
    return str(out)


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


class FaultyFS:
    """A mounted faultyfs: `swap` is the file a server swaps to, `backing`
    the real file behind it; `cached`: through the page cache, refusing
    O_DIRECT (the server falls back)."""

    def __init__(self, binary: str, tmp: Path, cached: bool = False):
        self.dir = tmp / "fuse"
        self.dir.mkdir()
        self.mnt, self.backing = self.dir / "mnt", self.dir / "backing"
        self.mnt.mkdir()
        fd = os.open(self.backing, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        self.swap = str(self.mnt / "swap")
        self.cached = cached
        self.log = self.dir / "faultyfs.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, *["--cached"] * cached, str(self.backing),
                                          str(self.mnt), "-f", "-o", "max_threads=8"],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_mounted(self) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"faultyfs exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()}")
            return mounted(self.mnt) and os.path.exists(self.mnt / ".ctl")
        wait_until(up, 10, "faultyfs did not mount")

    def set(self, line: str) -> None:
        """One command to the filesystem (see faultyfs.c): what fails next."""
        fd = os.open(self.mnt / ".ctl", os.O_WRONLY)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def counters(self) -> dict[str, int]:
        words = (self.mnt / ".ctl").read_text().split()
        return {k: int(v) for k, v in zip(words[::2], words[1::2])}

    def slots_of(self, npages: int, seed: int, gen: int) -> np.ndarray:
        """The slot that holds each page of a workload (seed, generation
        gen), read from the backing file; -1 where no slot holds it."""
        data = np.fromfile(self.backing, dtype="<u8")
        first = data[::PAGE // 8]  # word 0 of every slot
        want = pattern(np.arange(npages, dtype=np.uint64), seed, gen)
        where = {int(v): s for s, v in enumerate(first.tolist())}
        return np.array([where.get(int(v), -1) for v in want.tolist()], dtype=np.int64)

    def close(self) -> None:
        """End it by its pid and never leave the mount behind, whatever the
        test did (a server still holding the file gets ENOTCONN)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        assert not mounted(self.mnt), f"{self.mnt} is still mounted"
        self.backing.unlink(missing_ok=True)  # its blocks are allocated: not kept with tmp dirs


@pytest.fixture
def faulty(need_kernel, faultyfs_bin, tmp_path, request):
    """A disk that takes O_DIRECT; BOTH_MODES runs a test on one that does
    not too (the server's fallback mode, through the page cache)."""
    mode = getattr(request, "param", "direct")
    fs = FaultyFS(faultyfs_bin, tmp_path, cached=mode == "cached")
    try:
        fs.wait_mounted()
        yield fs
    finally:
        fs.close()


def pattern(i: np.ndarray, seed: int, gen: int) -> np.ndarray:
    """Word 0 of page i in native/tools/workload.c: splitmix64 of
    seed ^ (i << 20) ^ (gen << 40)."""
    with np.errstate(over="ignore"):
        x = np.uint64(seed) ^ (i << np.uint64(20)) ^ np.uint64(gen << 40)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_server(tmp: Path, fs: FaultyFS) -> tuple[Server, int]:
    port = free_port()
    s = Server(tmp, swap_size="64M", swap=fs.swap, state_dir=str(tmp / "state"),
               extra=["--metrics-addr", f"127.0.0.1:{port}"]).start()
    mode = s.status()["swap"]["io_mode"]
    # whatever fallback the server chose is fine: each drops what it cached,
    # so the reads reach the filesystem
    assert mode in (("dontcache", "buffered") if fs.cached else ("direct",)), mode
    print(f"swap io mode on FUSE: {mode}")
    return s, port


def filled(s: Server, mib: int, seed: int = 1, threads: int = 1) -> Workload:
    w = Workload(s.socket, mib=mib, threads=threads, seed=seed)
    wait_client(s, w.pid)
    w.cmd("fill 1")
    wait_until(lambda: s.client(w.pid)["managed_bytes"] >= mib * MIB,
               message=lambda: s.log_text())
    return w


def died(w: Workload, s: Server, timeout: float = 30) -> tuple[int, str]:
    """Wait for the workload to die; -> (returncode, its stderr). A wrong
    byte it saw on the way is a failure before a hang is."""
    try:
        code = w.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        w.proc.wait()
        code = None
    err = w.proc.stderr.read()
    assert "bad page" not in err, f"the program read wrong bytes: {err}"
    assert code is not None, f"the program waits on its unreadable page: {s.log_text()}"
    return code, err


def assert_read_errors_counted(port: int, log: str) -> None:
    """Each failed swap read is one error in the metrics, as it is one
    line in the log ("trying again", or the SIGBUS line after the last)."""
    failed = len(re.findall(r"; trying again$|cannot be read \(", log, re.M))
    assert failed, log
    wait_until(lambda: metric(port, "uffdsrv_errors_total", 'kind="swap_read"') >= failed,
               message=log)
    time.sleep(0.1)  # the fault engine's counters settle every 10 ms
    assert metric(port, "uffdsrv_errors_total", 'kind="swap_read"') == failed, log


def stopped(s: Server, timeout: float = 60) -> str:
    code = s.stop(timeout=timeout)
    log = s.log_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    return log


@BOTH_MODES
def test_failing_writes_cancel_the_batch_and_lose_nothing(faulty, tmp_path):
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 8)
        managed = s.client(w.pid)["managed_bytes"]
        faulty.set("write all all")
        assert s.reclaim(w.pid) == 0
        c = s.client(w.pid)
        assert c["swapped_bytes"] == 0 and c["resident_bytes"] == managed, c
        assert s.status()["swap"]["used_bytes"] == 0, "the failed batches kept their slots"
        # the writes were tried and refused, and no page was zapped
        assert faulty.counters()["failed_writes"] >= 1, faulty.counters()
        assert w.rss_kib() * 1024 >= managed
        assert w.verify() == (w.npages, 0)
        assert metric(port, "uffdsrv_errors_total", 'kind="swap_write"') >= 1
        assert "Input/output error" in s.log_text(), s.log_text()
        # the disk works again: so does reclaim, byte for byte
        faulty.set("ok")
        assert s.reclaim(w.pid) >= managed - MIB
        assert s.client(w.pid)["swapped_bytes"] >= managed - MIB
        reads = faulty.counters()["reads"]
        assert w.verify() == (w.npages, 0)
        assert faulty.counters()["reads"] > reads  # the pages came back from the disk
    finally:
        if w is not None:
            w.close()
        log = stopped(s)
    assert f"reclaim batch of pid {w.pid} failed" in log, log


@BOTH_MODES
def test_a_write_failing_mid_run_reclaims_all_of_the_batch_or_none(faulty, tmp_path):
    """The kernel cuts a batch's 8 MiB write into FUSE requests of 1 MiB;
    here the second one fails, once. A write(2) then returns short (what
    the requests before it wrote); through io_uring the requests go in
    parallel and the write fails whole (EIO). Either way no page may go
    whose bytes did not reach the disk: the batch is reclaimed whole (the
    short run written again) or not at all, and every page verifies."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 8)
        managed = s.client(w.pid)["managed_bytes"]
        faulty.set(f"write {MIB} {PAGE} 1")  # the next write that crosses 1 MiB fails
        got = s.reclaim(w.pid)
        assert faulty.counters()["failed_writes"] == 1, faulty.counters()
        assert metric(port, "uffdsrv_errors_total", 'kind="swap_write"') >= 1
        c = s.client(w.pid)
        assert got in (0, managed), got
        assert c["swapped_bytes"] == got and s.status()["swap"]["used_bytes"] == got, c
        print(f"a write failing mid-run: {'written again' if got else 'batch cancelled'}")
        assert w.verify() == (w.npages, 0)
        # the disk has recovered: all of it goes, and comes back
        assert s.reclaim(w.pid) >= managed - MIB
        assert w.verify() == (w.npages, 0)
    finally:
        if w is not None:
            w.close()
        stopped(s)


def test_one_failed_batch_keeps_its_pages_and_the_others_go(faulty, tmp_path):
    """Two batches in flight (24 MiB: 4096 pages, then 2048); the first
    write request of the disk fails, so one batch fails whole. Its pages
    stay resident and keep no slot; the other batch is reclaimed."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 24)
        managed = s.client(w.pid)["managed_bytes"]
        faulty.set("write all all 1")
        got = s.reclaim(w.pid)
        assert faulty.counters()["failed_writes"] == 1, faulty.counters()
        c = s.client(w.pid)
        assert got in (8 * MIB, 16 * MIB), got  # one batch or the other
        assert c["swapped_bytes"] == got and c["resident_bytes"] == managed - got, c
        assert s.status()["swap"]["used_bytes"] == got, "the failed batch kept its slots"
        assert w.verify() == (w.npages, 0)
    finally:
        if w is not None:
            w.close()
        stopped(s)


@pytest.mark.parametrize("threads,faulty", [(1, "direct"), (1, "cached"), (4, "direct")],
                         indirect=["faulty"])
def test_unreadable_pages_end_in_sigbus_and_other_clients_go_on(faulty, tmp_path, threads):
    """Every slot of one program is unreadable; with 4 threads, each
    faults on its own bad page at once."""
    s, port = start_server(tmp_path, faulty)
    a = b = None
    try:
        a, b = filled(s, 4, seed=1, threads=threads), filled(s, 4, seed=2)
        assert s.reclaim(a.pid) >= 3 * MIB and s.reclaim(b.pid) >= 3 * MIB
        sa = faulty.slots_of(a.npages, 1, 1)
        sb = faulty.slots_of(b.npages, 2, 1)
        assert (sa >= 0).all() and (sb >= 0).all(), "a page is in no slot"
        lo, hi = int(sa.min()) * PAGE, (int(sa.max()) + 1) * PAGE
        assert not ((sb * PAGE >= lo) & (sb * PAGE < hi)).any(), "the clients' slots interleave"
        faulty.set(f"read {lo} {hi - lo}")
        before = faulty.counters()["failed_reads"]
        a.proc.stdin.write("verify\n")
        a.proc.stdin.flush()
        t0 = time.monotonic()
        code, err = died(a, s)
        assert code == -signal.SIGBUS, (code, err)
        assert time.monotonic() - t0 < 10
        assert faulty.counters()["failed_reads"] - before >= SWAP_READ_TRIES
        m = re.search(rf"pid {a.pid}: the swap slot of page (0x[0-9a-f]+) cannot be read",
                      s.log_text())
        assert m, s.log_text()
        assert a.addr <= int(m.group(1), 16) < a.addr + a.npages * PAGE, (m.group(0), a.addr)
        assert_read_errors_counted(port, s.log_text())
        # the other client's pages are on readable slots: served, right
        assert b.verify() == (b.npages, 0)
        assert s.client(b.pid)["swapped_bytes"] == 0
        wait_until(lambda: all(c["pid"] != a.pid for c in s.status()["clients"]),
                   message="the dead program stays a client")
    finally:
        for w in (a, b):
            if w is not None:
                w.close()
        stopped(s)


def test_a_read_that_fails_twice_is_retried_and_serves_the_right_bytes(faulty, tmp_path):
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 4)
        assert s.reclaim(w.pid) >= 3 * MIB
        faulty.set(f"read all all {SWAP_READ_TRIES - 1}")  # the next two reads fail
        assert w.verify() == (w.npages, 0)
        assert faulty.counters()["failed_reads"] == SWAP_READ_TRIES - 1, faulty.counters()
        assert s.client(w.pid)["swapped_bytes"] == 0
        log = s.log_text()
        assert f"of pid {w.pid}: EIO; trying again" in log, log
        assert "cannot be read" not in log, log
        assert_read_errors_counted(port, log)
    finally:
        if w is not None:
            w.close()
        stopped(s)


def test_a_hiccup_shorter_than_the_retries_loses_nothing(faulty, tmp_path):
    """The disk fails every read for 200 ms. The server's tries of a slot
    are spaced 0.1 s, then 0.2 s (server/faults.py), so the last comes
    0.3 s after the first failure, when the disk is back: the program gets
    its bytes, no SIGBUS. Two tries at once (a woken thread's fault and the
    retry of the same page, both read) would spend the tries within the
    hiccup."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 4)
        assert s.reclaim(w.pid) >= 3 * MIB
        faulty.set("read all all 200ms")
        assert w.verify() == (w.npages, 0)
        log = s.log_text()
        assert faulty.counters()["failed_reads"] >= 1, faulty.counters()
        assert "cannot be read" not in log, log
    finally:
        if w is not None:
            w.close()
        stopped(s)


def test_one_bad_slot_fails_only_its_own_page(faulty, tmp_path):
    """The kernel's swap readahead drops a neighbour it cannot read; only
    the faulting page's own slot ends in SIGBUS. Here one slot in the
    middle is bad and the program reads its pages in order: every page
    before it must come back right, and the SIGBUS must be at that page."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 4)
        assert s.reclaim(w.pid) >= 3 * MIB
        slots = faulty.slots_of(w.npages, 1, 1)
        assert (slots >= 0).all(), "a page is in no slot"
        k = w.npages * 3 // 4
        faulty.set(f"read {int(slots[k]) * PAGE} {PAGE}")
        w.proc.stdin.write("verify\n")
        w.proc.stdin.flush()
        code, err = died(w, s)
        assert code == -signal.SIGBUS, (code, err)
        m = re.search(rf"pid {w.pid}: the swap slot of page (0x[0-9a-f]+) cannot be read",
                      s.log_text())
        assert m, s.log_text()
        assert int(m.group(1), 16) == w.addr + k * PAGE, \
            (f"SIGBUS at page {(int(m.group(1), 16) - w.addr) // PAGE}, the bad slot is "
             f"page {k}'s", s.log_text())
    finally:
        if w is not None:
            w.close()
        stopped(s)


@BOTH_MODES
def test_a_bad_first_slot_does_not_stop_a_restart_taking_over(faulty, tmp_path):
    """The server is killed; when the next one starts, the swap file's
    first slot cannot be read. The new server must still take the programs
    over: one that refused to start would leave every managed program
    waiting on its faults for as long as the disk is bad. The program whose
    page is in that slot gets SIGBUS there; the other one reads every page
    back."""
    s, port = start_server(tmp_path, faulty)
    a = b = None
    try:
        a = filled(s, 4, seed=1)
        assert s.reclaim(a.pid) >= 3 * MIB
        b = filled(s, 4, seed=2)
        assert s.reclaim(b.pid) >= 3 * MIB
        sa, sb = faulty.slots_of(a.npages, 1, 1), faulty.slots_of(b.npages, 2, 1)
        assert (sa == 0).sum() == 1 and (sb >= 0).all() and (sb != 0).all(), "slot 0 is a's"
        s.kill()
        faulty.set(f"read 0 {PAGE}")
        s = Server(tmp_path, swap_size="64M", swap=faulty.swap,
                   state_dir=str(tmp_path / "state"))
        s.start()
        wait_until(lambda: "took over 2 of 2" in s.log_text(), message=s.log_text)
        # (only direct I/O reads at start: it probes whether the file takes it)
        assert faulty.cached or "slot 0 cannot be read: Input/output error" in s.log_text()
        assert b.verify() == (b.npages, 0)
        a.proc.stdin.write("verify\n")
        a.proc.stdin.flush()
        code, err = died(a, s)
        assert code == -signal.SIGBUS, (code, err)
        page = int(np.flatnonzero(sa == 0)[0])
        assert f"pid {a.pid}: the swap slot of page {a.addr + page * PAGE:#x} cannot be read" \
            in s.log_text(), s.log_text()
    finally:
        for w in (a, b):
            if w is not None:
                w.close()
        stopped(s)


def test_a_stop_on_a_bad_disk_leaves_the_pages_for_the_next_server(faulty, tmp_path):
    """A graceful stop puts every page back first; the ones it cannot read
    stay reclaimed, the program stays registered, and its touch waits
    (never zeros) until the next server, which serves them once the disk
    reads again."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 4)
        assert s.reclaim(w.pid) >= 3 * MIB
        faulty.set("read all all")
        log = stopped(s, timeout=10)
        assert f"pid {w.pid} has " in log and "left registered" in log, log
        w.proc.stdin.write("verify\n")
        w.proc.stdin.flush()
        time.sleep(1)
        assert w.proc.poll() is None, w.proc.stderr.read()  # it waits, and saw no zeros
        faulty.set("ok")
        s = Server(tmp_path, swap_size="64M", swap=faulty.swap,
                   state_dir=str(tmp_path / "state"))
        s.start()
        assert w.proc.stdout.readline().split() == ["ok", str(w.npages), "0"]
        assert f"pid {w.pid} has " not in s.log_text().split("took over")[-1]
    finally:
        if w is not None:
            w.close()
        stopped(s)
