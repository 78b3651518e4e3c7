"""Programs that do not run as root (issue 11).

/dev/userfaultfd is 0600 root, the userfaultfd() syscall gives an
unprivileged caller only UFFD_USER_MODE_ONLY (vm.unprivileged_userfaultfd
= 0), and UFFDIO_API refuses UFFD_FEATURE_EVENT_FORK without
CAP_SYS_PTRACE. Such a program gets the device from the server (DEVICE)
and keeps fork right without fork events: its pages come back before each
fork (FORK_PREPARE), and the child starts as a client of its own
(server/forks.py, native/agent/agent.c).

The programs run as nobody/nogroup with no capabilities, under the system
Python (the venv's lives under /root, which nobody cannot read), with the
agent preloaded. UFFDSRV_TEST_AGENT=/path/to/libuffdsrv_agent.so runs them
with that agent instead of the built one: that is how each test was seen
to fail with the agent before this change (it printed "cannot create
userfaultfd: Operation not permitted; running unmanaged")."""
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, Server, wait_client
from ..support import wait_until
from .test_agent_safety import RECORDS, Program, reclaimed

NOBODY, NOGROUP = 65534, 65534
AGENT = os.environ.get("UFFDSRV_TEST_AGENT") or str(ROOT / "uffdsrv" / "_bin" /
                                                    "libuffdsrv_agent.so")
SYSTEM_PY = shutil.which("python3", path="/usr/bin:/bin")
# RECORDS, and a write(2) straight from the records: the kernel reads them
SCRIPT = RECORDS.replace('''    elif cmd == "exit":''', '''    elif cmd == "syswrite":
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            n, err = os.write(fd, memoryview(buf)), 0
        except OSError as e:
            n, err = -1, e.errno
        os.close(fd)
        with open(args[0], "rb") as f:
            same = f.read() == b"".join(rec(i) for i in range(N))
        say("ok", err, 0 if same and n == N * PAGE else 1)
    elif cmd == "exit":''')
assert SCRIPT != RECORDS
NO_FORK_LINE = "has no fork events (CAP_SYS_PTRACE): pages come back before each fork"


def as_nobody():
    os.setgroups([])
    os.setresgid(NOGROUP, NOGROUP, NOGROUP)
    os.setresuid(NOBODY, NOBODY, NOBODY)  # from root: every capability goes


class NobodyProgram(Program):
    """RECORDS as nobody, with the agent preloaded (LD_PRELOAD, as `uffdsrv
    run` does) into the program only, not into what starts it."""

    def __init__(self, socket_path: str, npages: int):
        env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": AGENT,
               "UFFDSRV_SOCKET": os.path.abspath(socket_path)}
        self.proc = subprocess.Popen([SYSTEM_PY, "-c", SCRIPT, str(npages), SCRIPT], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd="/",
                                     preexec_fn=as_nobody)
        self.npages = npages
        self._ready()

    def stderr(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        return self.proc.stderr.read()


@pytest.fixture
def srv(need_kernel):
    if SYSTEM_PY is None:
        pytest.skip("no system python3 that nobody may run")
    if os.stat("/dev/userfaultfd").st_mode & 0o006:
        pytest.skip("/dev/userfaultfd is open to everyone here: nothing to hand over")
    # nobody must reach the socket: not under pytest's 0700 tmp dirs
    d = Path(tempfile.mkdtemp(prefix="uffdsrv-nonroot-"))
    d.chmod(0o711)
    work = d / "work"
    work.mkdir()
    work.chmod(0o777)
    s = Server(d, swap_size="128M", extra=("--allow-uid", str(NOBODY))).start()
    progs = []
    try:
        yield s, progs, work
        for prog in progs:
            prog.close()
        code = s.stop() if s.poll() is None else 0
        assert "Traceback" not in s.log_text(), s.log_text()
        assert code == 0, s.log_text()
    finally:
        for prog in progs:
            prog.close()
        if s.poll() is None:
            s.kill()
        shutil.rmtree(d, ignore_errors=True)


def status_of(pid: int) -> tuple[int, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return int(fields["Uid"].split()[0]), fields["CapEff"].strip()


def test_a_program_of_nobody_is_managed_reclaimed_and_keeps_every_page(srv):
    s, progs, work = srv
    prog = NobodyProgram(s.socket, 2048)
    progs.append(prog)
    assert status_of(prog.pid) == (NOBODY, "0000000000000000")
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    assert s.client(prog.pid)["swapped_bytes"] >= prog.npages * 4096 * 9 // 10
    assert prog.bad() == 0
    # a kernel fault on a reclaimed page (write(2) from it) is served too:
    # a uffd of the userfaultfd() syscall (UFFD_USER_MODE_ONLY) fails it
    reclaimed(s, prog)
    assert prog.cmd(f"syswrite {work}/out") == ["0", "0"]
    assert prog.bad() == 0
    wait_until(lambda: NO_FORK_LINE in s.log_text(), 5, s.log_text)
    assert s.log_text().count(NO_FORK_LINE) == 1, s.log_text()
    prog.proc.stdin.write("exit\n")
    prog.proc.stdin.flush()
    err = prog.stderr()
    assert "uffdsrv" not in err, err


def test_a_fork_after_a_reclaim_gives_the_child_the_parents_data(srv):
    s, progs, work = srv
    prog = NobodyProgram(s.socket, 2048)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    t0 = time.monotonic()
    child = int(prog.cmd(f"fork {work}")[0])
    took = time.monotonic() - t0
    try:
        wait_until(lambda: (work / "child.1").exists() and (work / "child.1").read_text(), 30,
                   lambda: f"the child never checked its data: {s.log_text()}")
        cpid, bad, _ = (work / "child.1").read_text().split()
        assert int(cpid) == child
        assert int(bad) == 0, f"{bad} of {prog.npages} pages wrong in the child"
        # the child is a client of its own, and its pages come back too
        wait_client(s, child, timeout=15)
        reclaimed(s, prog, child)
        (work / "go").write_text("")
        wait_until(lambda: (work / "child.2").exists() and (work / "child.2").read_text(), 30,
                   lambda: f"the child never checked again: {s.log_text()}")
        assert (work / "child.2").read_text() == "0"
        assert prog.cmd(f"wait {child}") == ["0"]
    finally:
        (work / "go").write_text("")
    assert prog.bad() == 0
    # and the parent is reclaimed again after its fork
    reclaimed(s, prog)
    assert prog.bad() == 0
    prog.proc.stdin.write("exit\n")
    prog.proc.stdin.flush()
    err = prog.stderr()
    assert "uffdsrv" not in err, err
    assert took < 30, took


def test_a_fork_waits_for_a_stopped_server_rather_than_give_the_child_zeros(srv):
    """The pages can only come back from a server: a fork while the server
    is stopped waits for it, and the child still gets the parent's bytes.
    (What the program waits on may also be a fault of its own on a page
    it never touched: that too waits for the server.)"""
    s, progs, work = srv
    prog = NobodyProgram(s.socket, 1024)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        prog.proc.stdin.write(f"fork {work}\n")
        prog.proc.stdin.flush()
        r, _, _ = select.select([prog.proc.stdout], [], [], 1.5)
        assert not r, "fork() returned while the server that holds the pages was stopped"
        assert not (work / "child.1").exists()
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    out = prog.line(30).split()
    assert out[0] == "ok", out
    child = int(out[1])
    try:
        wait_until(lambda: (work / "child.1").exists() and (work / "child.1").read_text(), 30,
                   s.log_text)
        assert (work / "child.1").read_text().split()[:2] == [str(child), "0"]
    finally:
        (work / "go").write_text("")
    assert prog.cmd(f"wait {child}") == ["0"]
    assert prog.bad() == 0



def test_a_root_program_keeps_fork_events(srv):
    """Root has CAP_SYS_PTRACE: its uffd keeps EVENT_FORK, its child comes
    through the FORK event (named by its beacon), and no prepare is said."""
    s, progs, work = srv
    prog = Program(s.socket, 256)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    child = int(prog.cmd(f"fork {work}")[0])
    try:
        wait_until(lambda: f"pid {child} is a child of {prog.pid}" in s.log_text(), 15,
                   s.log_text)
        wait_until(lambda: (work / "child.1").exists() and (work / "child.1").read_text(), 30,
                   s.log_text)
        assert (work / "child.1").read_text().split()[1] == "0"
    finally:
        (work / "go").write_text("")
    assert prog.cmd(f"wait {child}") == ["0"]
    assert NO_FORK_LINE not in s.log_text(), s.log_text()
