"""A zap never outlives the server that asked for it (issue 11, item 1).

A ZAP request sits in the agent's socket until the agent's thread runs:
never while the program is stopped (SIGSTOP, a frozen cgroup, a debugger),
late when it is starved. The server cannot take it back. So a graceful stop
waits (bounded) for every zap's answer, and a program whose zap is still
unanswered is left registered, its page map in the journal, for the next
server; at run time an answer later than UFFDSRV_ZAP_TIMEOUT ends the
request, and the batch settles when the answer comes. Every program here
is let go (SIGCONT) and ended in a `finally`."""
import os
import signal
import time
from pathlib import Path

import pytest

from uffdsrv import ctl
from uffdsrv.core import journal
from uffdsrv.core.pages import PAGE

from ..conftest import Server, Workload, wait_client
from ..support import background, wait_until

MIB = 1 << 20


FREEZER = Path("/sys/fs/cgroup/freezer")


class Paused:
    """A program and its agent's zap helper (a process of its own since the
    agent clones it: a SIGSTOP of the program alone leaves it answering)
    stopped the way `docker pause` does, with the cgroup freezer, and
    SIGSTOPped too: nothing of it runs until resume()."""

    def __init__(self, w: Workload):
        if not (FREEZER / "cgroup.procs").exists():
            pytest.skip("needs the cgroup v1 freezer at /sys/fs/cgroup/freezer")
        self.pid = w.pid
        self.dir = FREEZER / f"uffdsrv-test-{os.getpid()}-{w.pid}"
        self.dir.mkdir()
        for p in [w.pid, *children(w.pid)]:
            (self.dir / "cgroup.procs").write_text(str(p))

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        (self.dir / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (self.dir / "freezer.state").read_text().strip() == "FROZEN",
                   message="the freezer never froze the program")

    def resume(self) -> None:
        if self.dir.exists():
            (self.dir / "freezer.state").write_text("THAWED")
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def remove(self) -> None:
        """Let go (always, in a `finally`): thawed, back in the root cgroup."""
        if not self.dir.exists():
            return
        self.resume()
        for p in (self.dir / "cgroup.procs").read_text().split():
            try:
                (FREEZER / "cgroup.procs").write_text(p)
            except OSError:
                pass
        try:
            self.dir.rmdir()
        except OSError:
            pass


def children(pid: int) -> list[int]:
    out = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in f.read_text().split()]
    return out


def reclaim_in_background(s: Server, pid: int, timeout: float = 120):
    return background(lambda: ctl.request(s.socket, "reclaim", pid=pid, keep_bytes=0,
                                          timeout=timeout))


def in_flight(s: Server, w: Workload) -> bool:
    """Some of the program's pages are in a batch (neither resident nor
    swapped): its zap is on its way."""
    c = s.client(w.pid)
    return c["resident_bytes"] + c["swapped_bytes"] < c["managed_bytes"]


def zap_sent(s: Server) -> bool:
    """A batch's SWAP records are in the journal: they are written just
    before its ZAP goes out, in the same turn of the server's loop."""
    data = (s.dir / "journal").read_bytes()
    n = len(data) // journal.REC.size
    return any(op == journal.SWAP for op, *_ in journal.REC.iter_unpack(
        data[:n * journal.REC.size]))


def swap_records(s: Server) -> int:
    """Pages with a SWAP record in the journal: the batches whose ZAP went out."""
    data = (s.dir / "journal").read_bytes()
    n = len(data) // journal.REC.size
    runs = {(rec[2], rec[3]) for rec in journal.REC.iter_unpack(data[:n * journal.REC.size])
            if rec[0] == journal.SWAP}  # (addr, npages)
    return sum(npages for _, npages in runs)


def consistent(s: Server, w: Workload) -> bool:
    """No page of w is left in flight, and the swap file holds exactly the
    clients' swapped pages (no slot leaked, none shared by mistake)."""
    st = s.status()
    c = next(c for c in st["clients"] if c["pid"] == w.pid)
    return (c["resident_bytes"] + c["swapped_bytes"] == c["managed_bytes"]
            and st["swap"]["used_bytes"] == sum(c["swapped_bytes"] for c in st["clients"]))


def stop_with_a_zap_queued(s: Server, w: Workload, frozen: Paused):
    """Freeze w, reclaim it, and stop the server while the zap waits in w's
    socket: the server must leave w registered, and say so. -> (the
    reclaim's thread, seconds the stop took)."""
    frozen.pause()
    t, _ = reclaim_in_background(s, w.pid)
    wait_until(lambda: zap_sent(s), message="no zap of the stopped program went out")
    t0 = time.monotonic()
    assert s.stop() == 0, s.log_text()
    seconds = time.monotonic() - t0
    log = s.log_text()
    assert f"pid {w.pid} did not answer its zap; left registered" in log, log
    assert "Traceback" not in log, log
    return t, seconds


def test_a_stop_while_a_zap_waits_in_a_stopped_program_loses_nothing(need_kernel, tmp_path):
    """Pause P; reclaim P; SIGTERM the server; resume P: the zap runs after
    the server is gone. The server left P registered, so the zap's REMOVEs
    and P's faults wait for the next one, which takes P over from the
    journal and reads the REMOVEs as its zap: every page reads back
    exactly, before and after the new server comes."""
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=32, threads=2)
    n = frozen = None
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 32 * MIB)
        frozen = Paused(w)
        t, stop_seconds = stop_with_a_zap_queued(s, w, frozen)
        # one or both of the pipelined batches sent their zap before the stop
        sent = swap_records(s) * PAGE
        assert sent >= 8 * MIB, sent
        frozen.resume()
        t.join(30)
        # no server: the zap's REMOVE waits, and so does any fault on it
        v, out = background(w.verify)
        v.join(2.0)
        if not v.is_alive():
            assert out.get("value") == (w.npages, 0), out
        n = Server(tmp_path).start()
        v.join(60)
        assert not v.is_alive(), "verify still waits after the new server started"
        assert out.get("value") == (w.npages, 0), out
        assert "took over 1 of 1" in n.log_text(), n.log_text()
        wait_until(lambda: n.client(w.pid)["agent"], message="the agent never came back")
        wait_until(lambda: consistent(n, w), message=lambda: str(n.status()))
        # the late zap, read as ours (as the program's, they would be zero pages)
        assert n.client(w.pid)["swapped_bytes"] >= sent * 0.9, (sent, n.status())
        assert w.verify() == (w.npages, 0)
        # managed in full by the new server: rewritten, reclaimed, read again
        w.cmd("write 2 3")
        assert n.reclaim(w.pid) > 24 * MIB
        assert w.verify() == (w.npages, 0)
        print(f"\nstop took {stop_seconds:.1f} s with a zap queued")
    finally:
        if frozen is not None:
            frozen.remove()
        w.close()
        if n is not None:
            n.stop()
        elif s.poll() is None:
            s.kill()


def zapper(w: Workload) -> int:
    """The pid of the agent's zap helper process, a child of the program."""
    for c in children(w.pid):
        try:
            if Path(f"/proc/{c}/comm").read_text().strip() == "uffdsrv-zap":
                return c
        except OSError:
            pass
    pytest.skip("the agent's zapper is not a process of its own here")


def test_a_write_before_a_late_zap_is_kept_across_a_restart(need_kernel, tmp_path):
    """Only the agent's zapper is stopped; the program runs. A zap covering
    pages that hold no slot (all zeros) is queued when the server stops; the
    program then writes every page, and the next server takes it over. The
    write must wait for the late zap (the journal's ZAP records hold those
    pages with the batch), or the zap drops what was just written."""
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=16, threads=1)
    n, helper = None, None
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        assert w.cmd("dontneed 0 1000") == "ok"  # the first pages the write reaches
        assert w.verify() == (w.npages, 0)  # the zero pages are present again
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 16 * MIB)
        helper = zapper(w)
        os.kill(helper, signal.SIGSTOP)
        t, _ = reclaim_in_background(s, w.pid)
        wait_until(lambda: zap_sent(s), message="no zap went out")
        assert s.stop() == 0, s.log_text()
        assert f"pid {w.pid} did not answer its zap; left registered" in s.log_text()
        t.join(30)
        wr, out = background(lambda: w.cmd("write 2 1"))
        n = Server(tmp_path).start()
        wr.join(1.0)  # the writes to the batch's pages wait for its zap
        os.kill(helper, signal.SIGCONT)
        wr.join(60)
        assert out.get("value") == "ok", out
        assert w.verify() == (w.npages, 0)
        wait_until(lambda: consistent(n, w), message=lambda: str(n.status()))
    finally:
        if helper is not None:
            cont(helper)
        w.close()
        if n is not None:
            n.stop()
        elif s.poll() is None:
            s.kill()


def cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_a_late_zap_answer_ends_the_request_and_settles_when_it_comes(need_kernel, tmp_path):
    """The program is paused while being reclaimed: the request ends after
    the zap timeout without counting pages it did not free, the client is
    skipped until it answers, and once it runs again the batch settles:
    status and swap usage agree, and every page reads back."""
    s = Server(tmp_path)
    s.env["UFFDSRV_ZAP_TIMEOUT"] = "2"
    s.start()
    w = Workload(s.socket, mib=32, threads=1)
    frozen = None
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 32 * MIB)
        frozen = Paused(w)
        frozen.pause()
        t0 = time.monotonic()
        got = ctl.request(s.socket, "reclaim", pid=w.pid, keep_bytes=0, timeout=20)
        assert time.monotonic() - t0 < 15
        assert got["reclaimed_bytes"] == 0, got  # nothing was dropped yet
        assert s.client(w.pid)["swapped_bytes"] == 0
        assert "has not answered its zap" in s.log_text()
        # skipped until it answers: a second request does not queue more zaps
        t0 = time.monotonic()
        again = ctl.request(s.socket, "reclaim", pid=w.pid, keep_bytes=0, timeout=20)
        assert again["reclaimed_bytes"] == 0 and time.monotonic() - t0 < 1.5, again
        frozen.resume()
        wait_until(lambda: s.client(w.pid)["swapped_bytes"] >= 24 * MIB,
                   message=lambda: f"the late batches never settled: {s.status()}")
        wait_until(lambda: consistent(s, w), message=lambda: str(s.status()))
        assert "answered its zap after" in s.log_text()
        assert w.verify() == (w.npages, 0)
        w.cmd("write 2 1")
        assert s.reclaim(w.pid) >= 24 * MIB  # reclaimed again, and counted
        assert consistent(s, w), s.status()
        assert w.verify() == (w.npages, 0)
    finally:
        if frozen is not None:
            frozen.remove()
        w.close()
    assert s.stop() == 0
    assert "Traceback" not in s.log_text(), s.log_text()


def test_stopped_programs_neither_stall_others_nor_hang_their_requests(need_kernel, tmp_path):
    """Two paused programs being reclaimed hold nothing a third, running
    one needs: its reclaim completes in bounded time. The paused ones'
    requests end at the zap timeout, and once they run everything settles;
    a graceful stop then puts every page back."""
    s = Server(tmp_path)
    s.env["UFFDSRV_ZAP_TIMEOUT"] = "3"
    s.start()
    ws, frozen = [], []
    try:
        ws = [Workload(s.socket, mib=24, threads=1, seed=k) for k in (1, 2, 3)]
        for w in ws:
            wait_client(s, w.pid)
            w.cmd("fill 1")
            wait_until(lambda w=w: s.client(w.pid)["managed_bytes"] >= 24 * MIB)
        stopped, running = ws[:2], ws[2]
        for w in stopped:
            frozen.append(Paused(w))
            frozen[-1].pause()
        bg = [reclaim_in_background(s, w.pid, timeout=30) for w in stopped]
        wait_until(lambda: all(in_flight(s, w) for w in stopped),
                   message="the stopped programs' reclaims never started")
        t0 = time.monotonic()
        got = ctl.request(s.socket, "reclaim", pid=running.pid, keep_bytes=0, timeout=20)
        assert got["reclaimed_bytes"] >= 20 * MIB and time.monotonic() - t0 < 10, got
        assert running.verify() == (running.npages, 0)
        for t, out in bg:
            t.join(20)
            assert not t.is_alive(), "a stopped program's reclaim request still hangs"
            assert out.get("value", {}).get("reclaimed_bytes") == 0, out
        for f in frozen:
            f.resume()
        for w in stopped:
            wait_until(lambda w=w: consistent(s, w) and s.client(w.pid)["swapped_bytes"] > 0,
                       message=lambda: str(s.status()))
            assert w.verify() == (w.npages, 0)
        for w in ws:  # every one reclaimed in full again, and counted
            assert s.reclaim(w.pid) >= 20 * MIB
        assert s.stop() == 0
        log = s.log_text()
        assert "left registered for" not in log and "Traceback" not in log, log
        for w in ws:  # unmanaged now, every page put back
            assert w.verify() == (w.npages, 0)
    finally:
        for f in frozen:
            f.remove()
        for w in ws:
            w.close()
        if s.poll() is None:
            s.kill()


def test_a_program_killed_while_its_late_zap_waits_leaves_no_helper_behind(need_kernel,
                                                                             tmp_path):
    """The server stops with a zap queued in a frozen program and leaves it
    registered; thawed, the program's zap waits in the kernel for a REMOVE
    nobody reads. If the program is then killed, its zap helper must end
    too: stuck in that wait it would keep the program's whole memory alive
    for ever (only a fatal signal ends the wait)."""
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=16, threads=1)
    frozen = helper = None
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 16 * MIB)
        helper = zapper(w)
        frozen = Paused(w)
        t, _ = stop_with_a_zap_queued(s, w, frozen)
        frozen.resume()
        t.join(30)
        # the zap is in the kernel now, waiting on its REMOVE
        wait_until(lambda: Path(f"/proc/{helper}/wchan").read_text().startswith("userfaultfd"),
                   timeout=10, message="the helper never began its zap")
        w.proc.kill()
        w.proc.wait(10)
        wait_until(lambda: not Path(f"/proc/{helper}").exists()
                   or Path(f"/proc/{helper}/stat").read_text().split()[2] == "Z", timeout=10,
                   message=lambda: f"helper {helper} outlives its program: "
                   f"{Path(f'/proc/{helper}/stat').read_text()}")
    finally:
        if frozen is not None:
            frozen.remove()
        if helper is not None and Path(f"/proc/{helper}").exists():
            try:
                os.kill(helper, signal.SIGKILL)  # our own test's program's helper
            except OSError:
                pass
        w.close()
        if s.poll() is None:
            s.kill()
