"""Failed swap reads on the fault path, and the loose ends of the zap work.

On a failing disk (faultyfs, see test_disk_errors.py): a stop in the middle
of failing reads reads nothing on the swap fd once it is closed (its number
could be another file's by then), ends no fault in SIGBUS, and leaves the
program for the next server, which serves every page; the log says a
failing disk in a bounded number of lines; a page lost to its slot is
counted once. And: a client whose zap is unanswered says so in status,
the journal is compacted around its held batch (and the snapshot is right:
a crash after it loses nothing), and an agent that reconnects fails the
waits left on its old connection."""
import asyncio
import os
import re
import signal
import socket
import time
import urllib.request

from uffdsrv import ctl
from uffdsrv.core import protocol
from uffdsrv.core.pages import PAGE

from ..conftest import Server, Workload, uffdsrv, wait_client
from ..support import wait_until
from .test_disk_errors import died, faulty, faultyfs_bin, filled, metric, stopped
from .test_disk_errors import start_server as disk_server
from .test_zap_safety import Paused, consistent

MIB = 1 << 20
__all__ = ["faulty", "faultyfs_bin"]  # fixtures, used by name
CLOSED_FD = re.compile(r"EBADF|ESPIPE|Bad file descriptor|Illegal seek")


def start_server(tmp, fs, env=None):
    """test_disk_errors.start_server, with the server's environment."""
    if not env:
        return disk_server(tmp, fs)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the server process inherits it at start
    try:
        return disk_server(tmp, fs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plain_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} is not exported"
    return float(m.group(1))


def next_server(tmp_path, fs) -> Server:
    return Server(tmp_path, swap_size="64M", swap=fs.swap,
                  state_dir=str(tmp_path / "state")).start()


def test_a_stop_during_failing_reads_reads_no_closed_fd_and_leaves_every_page(faulty,
                                                                                tmp_path):
    """Four threads fault on pages whose reads fail; the server is stopped
    while their tries are spaced out on timers. None of those timers may
    read after the swap file is closed, and no fault may end in SIGBUS:
    the program waits, and the next server serves every page right."""
    s, port = start_server(tmp_path, faulty, env={"UFFDSRV_READ_RETRY_SECONDS": "5"})
    w = None
    try:
        w = filled(s, 4, threads=4)
        assert s.reclaim(w.pid) >= 3 * MIB
        faulty.set("read all all")
        w.proc.stdin.write("verify\n")
        w.proc.stdin.flush()
        # the first tries failed; the next are on timers (5 s here, so that
        # they are still due when the stop comes, however slow this machine)
        wait_until(lambda: s.log_text().count("; trying again") >= 4, message=s.log_text)
        log = stopped(s, timeout=20)
        assert not CLOSED_FD.search(log), log
        assert "cannot be read" not in log, log  # no SIGBUS for a program left registered
        assert f"pid {w.pid} has " in log and "left registered" in log, log
        time.sleep(1)
        assert w.proc.poll() is None, w.proc.stderr.read()
        faulty.set("ok")
        s = next_server(tmp_path, faulty)
        assert w.proc.stdout.readline().split() == ["ok", str(w.npages), "0"]
        assert w.verify() == (w.npages, 0)
    finally:
        if w is not None:
            w.close()
        log = stopped(s)
    assert not CLOSED_FD.search(log), log


def test_a_disk_failing_every_read_is_said_in_a_bounded_number_of_lines(faulty, tmp_path):
    """A stop on a disk that fails every read, 4096 swapped pages: each
    load is tried once in the pass (no immediate reload), and the lines are
    rate-limited, the rest said in a summary with their number."""
    from uffdsrv.server.read_errors import LOG_BURST
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 16)
        assert s.reclaim(w.pid) >= 15 * MIB
        swapped = s.client(w.pid)["swapped_bytes"] // PAGE
        faulty.set("read all all")
        t0 = time.monotonic()
        log = stopped(s, timeout=20)
        assert time.monotonic() - t0 < 10, "the stop spun on reads it knew to fail"
        lines = re.findall(r"^.*swap read of .*$", log, re.M)
        held = [int(n) for n in re.findall(r"^.*\b(\d+) more failed reads left swapped in the last",
                                           log, re.M)]
        assert 0 < len(lines) <= LOG_BURST, len(lines)
        assert held, log[-3000:]
        # each load of at most 32 pages failed once: no page was loaded twice
        assert swapped // 32 <= len(lines) + sum(held) <= swapped, (len(lines), held, swapped)
        assert "left registered" in log, log[-3000:]
        faulty.set("ok")
        s = next_server(tmp_path, faulty)
        assert w.verify() == (w.npages, 0)
    finally:
        if w is not None:
            w.close()
        stopped(s)


def test_a_page_lost_to_an_unreadable_slot_is_counted_once(faulty, tmp_path):
    """One bad slot: the page read ahead with it is not poisoned (no thread
    waits on it), only the faulting page is, and that is one lost page in
    the metrics and in status."""
    s, port = start_server(tmp_path, faulty)
    w = None
    try:
        w = filled(s, 4)
        assert s.reclaim(w.pid) >= 3 * MIB
        assert s.status()["pages_lost_to_io_errors"] == 0
        slots = faulty.slots_of(w.npages, 1, 1)
        k = w.npages // 2
        faulty.set(f"read {int(slots[k]) * PAGE} {PAGE}")
        w.proc.stdin.write("verify\n")
        w.proc.stdin.flush()
        code, err = died(w, s)
        assert code == -signal.SIGBUS, (code, err)
        time.sleep(0.5)  # a poison of the pages read ahead would come 0.1 s on
        assert s.status()["pages_lost_to_io_errors"] == 1, s.log_text()
        out = uffdsrv("top", "--socket", s.socket, "--once", timeout=60).stdout
        assert "pages lost to swap read errors (SIGBUS): 1\n" in out, out
        assert plain_metric(port, "uffdsrv_pages_lost_to_io_errors_total") == 1
        assert metric(port, "uffdsrv_errors_total", 'kind="swap_read"') >= 3
    finally:
        if w is not None:
            w.close()
        stopped(s)


def test_a_held_zap_shows_in_status_and_compaction_goes_on_around_it(need_kernel, tmp_path):
    """A paused program's batch waits for its zap's answer (held); another
    program's reclaims grow the journal past its compaction size: the
    journal is rewritten all the same. The snapshot must say the held batch
    right: the server is then killed, the paused program let go (its zap
    runs), and the next server reads both programs' pages back right."""
    s = Server(tmp_path)
    s.env["UFFDSRV_ZAP_TIMEOUT"] = "1"
    s.env["UFFDSRV_COMPACT_BYTES"] = str(64 << 10)
    s.start()
    a = Workload(s.socket, mib=8, threads=1, seed=1)
    b = Workload(s.socket, mib=8, threads=1, seed=2)
    frozen = None
    try:
        for w in (a, b):
            wait_client(s, w.pid)
            w.cmd("fill 1")
            wait_until(lambda w=w: s.client(w.pid)["managed_bytes"] >= 8 * MIB)
        assert not s.client(a.pid)["zap_pending"]
        frozen = Paused(a)
        frozen.pause()
        got = ctl.request(s.socket, "reclaim", pid=a.pid, keep_bytes=0, timeout=20)
        assert got["reclaimed_bytes"] == 0, got
        assert s.client(a.pid)["zap_pending"] and not s.client(b.pid)["zap_pending"]
        out = uffdsrv("top", "--socket", s.socket, "--once", timeout=60).stdout
        assert f"zap unanswered: pid {a.pid}\n" in out, out
        journal = s.dir / "journal"
        biggest = 0
        for _ in range(100):  # every cycle writes SWAP, SETTLED and FREE records
            assert s.reclaim(b.pid, keep=0) >= 0
            assert b.verify() == (b.npages, 0)
            biggest = max(biggest, journal.stat().st_size)
            if biggest > (96 << 10):
                break
        assert biggest > (64 << 10), biggest
        wait_until(lambda: journal.stat().st_size < biggest, timeout=5,
                   message=lambda: f"never compacted around the held batch: "
                                   f"{journal.stat().st_size} bytes")
        assert s.client(a.pid)["zap_pending"]
        s.kill()
        frozen.resume()  # its zap runs now, or is refused: either way nothing is lost
        s = Server(tmp_path).start()
        wait_until(lambda: "took over 2 of 2" in s.log_text(), message=s.log_text)
        assert a.verify() == (a.npages, 0)
        assert b.verify() == (b.npages, 0)
        wait_until(lambda: not s.client(a.pid)["zap_pending"], message=lambda: str(s.status()))
        wait_until(lambda: consistent(s, a), message=lambda: str(s.status()))
    finally:
        if frozen is not None:
            frozen.remove()
        a.close()
        b.close()
    assert s.stop() == 0
    assert "Traceback" not in s.log_text(), s.log_text()


def test_a_reconnecting_agent_fails_the_waits_on_its_old_connection():
    """attach_agent with a HELLO_RECONNECT from a known client: a zap
    awaited on the old connection gets an error at once (the agent says
    HELLO again only once its zaps are over), not a wait for ever."""
    from uffdsrv.server.daemon import Server as Daemon
    from uffdsrv.server.managed import AgentLink, ManagedProcess, Registry

    class Conn:
        def __init__(self, sock):
            self.sock, self.pid = sock, os.getpid()

    async def run():
        d = Daemon.__new__(Daemon)
        d.clients, d.zap_flags = Registry(), 0
        settled = []
        d.takeover = type("T", (), {"settle": lambda self, c: settled.append(c)})()
        client = ManagedProcess(-1, os.getpid())
        d.clients.add(client)
        old_a, old_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        new_a, new_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            client.agent = AgentLink(old_a)
            fut, = client.agent.zap([1 << 20], [PAGE])
            got, kept = d.attach_agent(Conn(new_a), {"flags": protocol.HELLO_RECONNECT}, None)
            assert got is client and not kept
            assert client.agent.sock is new_a
            await asyncio.sleep(0)
            assert fut.done() and isinstance(fut.exception(), ConnectionError), fut
            await asyncio.sleep(0.05)
        finally:
            for x in (old_a, old_b, new_a, new_b):
                x.close()

    asyncio.run(run())


def test_a_restore_pass_skips_exactly_the_windows_that_failed():
    """restore_gaps: each failed load's window (MAX_READAHEAD pages from its
    first, cut at its region's end) is left out; the rest is kept, in order."""
    from types import SimpleNamespace

    from uffdsrv.core.pages import PageMap
    from uffdsrv.server.read_errors import restore_gaps
    pages = PageMap()
    a = 1 << 30
    pages.add(a, a + 100 * PAGE)
    pages.add(a + 100 * PAGE, a + 110 * PAGE)  # adjacent: a window stops at the first's end
    c = SimpleNamespace(pages=pages)
    end = a + 110 * PAGE
    assert restore_gaps(c, a, end, []) == [(a, end)]
    assert restore_gaps(c, a, end, [a + 10 * PAGE]) == [(a, a + 10 * PAGE),
                                                        (a + 42 * PAGE, end)]
    assert restore_gaps(c, a, end, [a + 90 * PAGE, a + 90 * PAGE]) == [
        (a, a + 90 * PAGE), (a + 100 * PAGE, end)]
    assert restore_gaps(c, a, end, [a, a + 32 * PAGE, a + 64 * PAGE, a + 96 * PAGE,
                                    a + 100 * PAGE]) == []


def test_log_lines_of_a_kind_are_limited_and_the_rest_summed_up(caplog):
    """ReadErrors._say: LOG_BURST lines per LOG_PERIOD, then one summary line
    with the number held back, at the period's end (or at close)."""
    import logging
    from types import SimpleNamespace

    from uffdsrv.server import read_errors as re_

    class Loop:
        def __init__(self):
            self.now, self.later = 0.0, []

        def time(self):
            return self.now

        def call_later(self, delay, fn, *args):
            h = SimpleNamespace(run=lambda: fn(*args), cancel=lambda: None)
            self.later.append(h)
            return h

    loop = Loop()
    e = re_.ReadErrors(loop, None, None)
    with caplog.at_level(logging.ERROR, logger="uffdsrv.faults"):
        for i in range(re_.LOG_BURST + 30):
            e._say("left", "line %d", i)
        assert len(caplog.records) == re_.LOG_BURST
        assert len(loop.later) == 1  # one summary due, not one per line held back
        loop.now += re_.LOG_PERIOD
        loop.later[0].run()
        assert caplog.records[-1].getMessage() == \
            f"30 more failed reads left swapped in the last {re_.LOG_PERIOD:g} s"
        e._say("left", "again")
        e.close()
        assert caplog.records[-1].getMessage() == "again"  # nothing held back since


def test_an_unregister_on_an_unreadable_disk_keeps_the_range_managed(faulty, tmp_path):
    """The program's UNREGISTER puts its pages back first; a page whose slot
    cannot be read stays swapped, and unregistered it would read as zeros.
    So the request is refused and the range stays managed; once the disk
    reads again, every page comes back."""
    import subprocess
    import sys
    from pathlib import Path
    s, _ = start_server(tmp_path, faulty)
    prog = subprocess.Popen([sys.executable, str(Path(__file__).with_name("api_program.py")),
                             s.socket, "1024"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)

    def ask(line):
        prog.stdin.write(line + "\n")
        prog.stdin.flush()
        return prog.stdout.readline().split()
    try:
        ready = prog.stdout.readline().split()
        assert ready[0] == "ready", ready
        pid = int(ready[1])
        wait_client(s, pid)
        assert s.reclaim(pid) >= 3 * MIB
        faulty.set("read all all")
        answer = ask("unregister")
        assert answer[0] == "error", (answer, s.log_text())
        assert s.client(pid)["managed_bytes"] == 4 * MIB
        faulty.set("ok")
        assert ask("verify") == ["ok", "0"], s.log_text()
    finally:
        faulty.set("ok")
        prog.kill()
        prog.wait()
        stopped(s)
