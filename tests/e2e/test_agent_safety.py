"""The agent inside programs that do what real programs do: close every fd
and reuse the numbers, enter user and mount namespaces, end their main
thread with pthread_exit, exec, fork, crash with core dumps on, or meet a
listener that is not the server. The zapper is a CLONE_VM helper process
(native/agent/agent.c), so none of this may reach the agent's fds, keep
the process alive, or hold up fork().

UFFDSRV_TEST_AGENT=/path/to/libuffdsrv_agent.so runs the programs with that
agent (LD_PRELOAD, as `uffdsrv run` does) instead of the built one: that is
how each test was seen to fail with the agent whose zapper was a thread."""
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from uffdsrv.core import protocol as p
from uffdsrv.system import proc, procfs

from ..conftest import PY, ROOT, Server, wait_client
from ..support import wait_until

PAGE = 4096
TOOLS = ROOT / "uffdsrv" / "_bin"
AGENT = os.environ.get("UFFDSRV_TEST_AGENT")

# A Python program holding N pages of known records in an anonymous
# mapping, driven by one command per line on stdin.
RECORDS = textwrap.dedent(r'''
    import ctypes, mmap, os, sys, time
    PAGE = 4096
    N = int(sys.argv[1])
    buf = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    libc = ctypes.CDLL(None, use_errno=True)
    def rec(i):
        return (b"UFFDSRV-REC:%08d:" % i).ljust(64, b"#") * (PAGE // 64)
    for i in range(N):
        buf[i * PAGE:(i + 1) * PAGE] = rec(i)
    def bad():
        return sum(buf[i * PAGE:(i + 1) * PAGE] != rec(i) for i in range(N))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    own = {}
    def say(*a):
        os.write(1, (" ".join(map(str, a)) + "\n").encode())
    say("ready", os.getpid(), addr)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "verify":
            say("ok", bad())
        elif cmd == "closefrom":
            # as sshd's closefrom(3), then take the low and the 900s numbers
            os.closerange(3, 65536)
            for want in (3, 4, 5, 900, 901, 902, 903):
                fd = os.open(f"{args[0]}/file{want}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                if fd != want:
                    os.dup2(fd, want)
                    os.close(fd)
                os.write(want, b"mine:%d\n" % want)
                own[want] = b"mine:%d\n" % want
            say("ok", sorted(int(n) for n in os.listdir("/proc/self/fd")))
        elif cmd == "files":
            wrong = 0
            for fd, data in own.items():
                os.write(fd, b"more:%d\n" % fd)
                own[fd] = data + b"more:%d\n" % fd
                if os.pread(fd, 4096, 0) != own[fd]:
                    wrong += 1
            say("ok", wrong)
        elif cmd == "unshare":
            r = libc.unshare(int(args[0], 0))
            say("ok", r, ctypes.get_errno())
        elif cmd == "setns":  # into a namespace of its own kind, as nsenter does
            fd = os.open(f"/proc/self/ns/{args[0]}", os.O_RDONLY)
            r = libc.setns(fd, 0)
            say("ok", r, ctypes.get_errno())
            os.close(fd)
        elif cmd == "fork":
            # the child checks the parent's data, then waits to be reclaimed
            d = args[0]
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:
                took = time.monotonic() - t0
                with open(f"{d}/child.1", "w") as f:
                    f.write(f"{os.getpid()} {bad()} {took}")
                while not os.path.exists(f"{d}/go"):
                    time.sleep(0.02)
                with open(f"{d}/child.2", "w") as f:
                    f.write(f"{bad()}")
                os._exit(0)
            say("ok", pid, time.monotonic() - t0)
        elif cmd == "wait":
            pid, status = os.waitpid(int(args[0]), 0)
            say("ok", status)
        elif cmd == "exec":
            os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], args[0], sys.argv[2]])
        elif cmd == "drop":  # as a daemon that drops root after start
            os.setgroups([])
            os.setresgid(int(args[0]), int(args[0]), int(args[0]))
            os.setresuid(int(args[0]), int(args[0]), int(args[0]))
            say("ok")
        elif cmd == "abort":
            os.abort()
        elif cmd == "exit":
            say("bye")
            break
''')


def managed(socket_path: str, argv: list[str]) -> tuple[list[str], dict]:
    """argv and env to run a program under the agent."""
    env = dict(os.environ)
    if AGENT:
        env.update(LD_PRELOAD=AGENT, UFFDSRV_SOCKET=os.path.abspath(socket_path))
        return argv, env
    return [PY, "-m", "uffdsrv", "run", "--socket", socket_path, "--", *argv], env


class Program:
    """RECORDS under the agent: one command in, one line out."""

    def __init__(self, socket_path: str, npages: int, preexec=None):
        argv, env = managed(socket_path, [PY, "-c", RECORDS, str(npages), RECORDS])
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     preexec_fn=preexec)
        self.npages = npages
        self._ready()

    def _ready(self):
        ready = self.line(30).split()
        assert ready and ready[0] == "ready", (ready, self.proc.stderr.read())
        self.pid, self.addr = int(ready[1]), int(ready[2])

    def line(self, timeout: float = 60) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, f"no answer from the program within {timeout} s"
        out = self.proc.stdout.readline().strip()
        assert out, f"the program died: {self.proc.stderr.read()}"
        return out

    def cmd(self, line: str, timeout: float = 60) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.line(timeout).split()
        assert out[0] == "ok", out
        return out[1:]

    def bad(self) -> int:
        return int(self.cmd("verify")[0])

    def resident(self, pid: int | None = None) -> int:
        return int(proc.pagemap_present(pid or self.pid, self.addr, self.npages).sum())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def reclaimed(s: Server, prog: Program, pid: int | None = None) -> None:
    """Reclaim until (nearly) all of the records are out of memory: the
    mapping is found by the server's rescan of /proc/PID/maps."""
    pid = pid or prog.pid

    def done():
        s.reclaim(pid)
        return prog.resident(pid) <= prog.npages // 20
    wait_until(done, 20, lambda: f"records of pid {pid} never reclaimed: {s.log_text()}",
               interval=0.2)


def zap_helpers(pid: int) -> list[int]:
    """Live children of pid that share its mm."""
    return [h for h in procfs.helpers(pid) if (procfs._read(f"/proc/{h}/stat") or "Z").split(
        ") ")[-1][:1] not in ("Z", "X")]


@pytest.fixture
def srv(need_kernel, tmp_path):
    s = Server(tmp_path, swap_size="256M").start()
    progs = []
    yield s, progs
    for prog in progs:
        prog.close()
    code = s.stop() if s.poll() is None else 0
    assert "Traceback" not in s.log_text(), s.log_text()
    assert code == 0, s.log_text()


def test_closefrom_and_reused_numbers_leave_the_agent_and_the_files_alone(srv, tmp_path):
    s, progs = srv
    prog = Program(s.socket, 1024)
    progs.append(prog)
    wait_client(s, prog.pid)
    fds = prog.cmd(f"closefrom {tmp_path}")
    assert "903" in " ".join(fds)
    reclaimed(s, prog)
    assert prog.bad() == 0
    assert prog.cmd("files") == ["0"]
    # the agent is still the server's: a second round trip works
    reclaimed(s, prog)
    assert prog.bad() == 0
    assert prog.cmd("files") == ["0"]
    for want in (3, 4, 5, 900, 901, 902, 903):
        text = (tmp_path / f"file{want}").read_bytes()
        assert text == b"mine:%d\nmore:%d\nmore:%d\n" % (want, want, want), (want, text)
    assert s.stop() == 0
    assert prog.bad() == 0  # every page put back, none zeroed
    assert prog.cmd("files") == ["0"]


def test_unshare_user_and_mount_namespaces_run_managed(srv):
    s, _ = srv
    for flags in ("-U", "-Um"):
        argv, env = managed(s.socket, ["unshare", flags, "true"])
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, (flags, r.stderr)
        assert "Invalid argument" not in r.stderr, r.stderr


def test_a_program_that_unshares_itself_is_still_reclaimed(srv):
    s, progs = srv
    prog = Program(s.socket, 512)
    progs.append(prog)
    wait_client(s, prog.pid)
    # setns() into a mount namespace needs an fs_struct of its own: a
    # thread shares it (EINVAL), a helper process does not
    assert prog.cmd("setns mnt") == ["0", "0"]
    CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
    assert prog.cmd(f"unshare {CLONE_NEWUSER | CLONE_NEWNS:#x}") == ["0", "0"]
    reclaimed(s, prog)
    assert prog.bad() == 0


def test_pthread_exit_of_the_main_thread_ends_the_process(srv):
    s, _ = srv
    argv, env = managed(s.socket, [str(TOOLS / "mainexit")])
    pr = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)
    try:
        assert pr.stdout.readline().split() == ["started", str(pr.pid)]
        wait_until(lambda: f"pid {pr.pid} " in s.log_text(), 10, s.log_text)  # it was managed
        assert pr.wait(timeout=10) == 0, pr.stderr.read()
        assert pr.stdout.read().split() == ["worker", "done"]
    finally:
        if pr.poll() is None:
            pr.kill()
            pr.wait()


def test_exec_d_children_see_none_of_the_agents_fds(srv):
    s, _ = srv
    argv, env = managed(s.socket, ["sh", "-c", "ls /proc/self/fd"])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # ls itself holds the directory it lists: 0, 1, 2 and one more
    fds = sorted(int(x) for x in r.stdout.split())
    assert fds[:3] == [0, 1, 2] and len(fds) == 4 and fds[3] < 10, fds
    # and a program's own view (the managed Python itself) has only its own
    prog = Program(s.socket, 16)
    try:
        wait_client(s, prog.pid)
        held = sorted(int(n) for n in os.listdir(f"/proc/{prog.pid}/fd"))
        assert held == [0, 1, 2], held
        helpers = zap_helpers(prog.pid)  # the uffd is in the helper's table
        assert len(helpers) == 1 and procfs.uffd_fds(helpers[0]), helpers
    finally:
        prog.close()


def test_fork_child_is_managed_and_fork_does_not_wait(srv, tmp_path):
    s, progs = srv
    prog = Program(s.socket, 1024)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    child, took = prog.cmd(f"fork {tmp_path}")
    child = int(child)
    got = wait_until(lambda: (tmp_path / "child.1").exists() and (tmp_path / "child.1").read_text(),
                     20, lambda: f"the child never answered: {s.log_text()}")
    cpid, cbad, _ = got.split()
    assert int(cpid) == child and int(cbad) == 0, got
    wait_client(s, child)
    assert zap_helpers(child), "the child has no zap helper"
    reclaimed(s, prog, child)
    (tmp_path / "go").touch()
    assert prog.cmd(f"wait {child}") == ["0"]
    assert (tmp_path / "child.2").read_text() == "0"
    assert prog.bad() == 0


def test_fork_returns_while_the_server_does_not_answer(need_kernel, tmp_path):
    """A listener that answers the program's HELLO and then nothing: fork()
    in the program must not wait for an answer to its child's HELLO (the
    zap-thread agent waited 10 s for it inside fork)."""
    path = str(tmp_path / "mute.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(path)
    lst.listen(16)
    conns = []
    code = textwrap.dedent('''
        import os, sys, time
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.write(1, b"child %.3f\\n" % (time.monotonic() - t0))
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent %.3f" % (time.monotonic() - t0), flush=True)
    ''')
    argv, env = managed(path, [PY, "-c", code])
    pr = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)
    try:
        lst.settimeout(30)
        first, _ = lst.accept()
        conns.append(first)
        msg, anc, _, _ = first.recvmsg(4096, socket.CMSG_SPACE(16))
        assert p.header(msg)[0] == p.HELLO
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4]):
                    os.close(fd)
        first.send(p.pack(p.HELLO_OK, p.header(msg)[1], b"\0" * 8))
        lst.setblocking(False)
        out = ""
        deadline = time.monotonic() + 30
        while pr.poll() is None and time.monotonic() < deadline:
            try:
                c, _ = lst.accept()  # the child's HELLO: never answered
                conns.append(c)
            except BlockingIOError:
                time.sleep(0.01)
        out = pr.stdout.read()
        assert pr.wait(timeout=30) == 0, pr.stderr.read()
    finally:
        if pr.poll() is None:
            pr.kill()
            pr.wait()
        for c in conns:
            c.close()
        lst.close()
    times = dict(line.split() for line in out.splitlines())
    assert float(times["child"]) < 1.0, out
    assert float(times["parent"]) < 2.0, out


def test_exec_ends_the_old_helper_and_the_new_image_is_managed(srv):
    s, progs = srv
    prog = Program(s.socket, 512)
    progs.append(prog)
    wait_client(s, prog.pid)
    old = zap_helpers(prog.pid)
    assert len(old) == 1, old
    reclaimed(s, prog)
    prog.proc.stdin.write("exec 256\n")
    prog.proc.stdin.flush()
    pid = prog.pid
    prog.npages = 256
    prog._ready()
    assert prog.pid == pid
    # no process is left with the old mm: the new image's agent ended the
    # old helper and reaped it (not even a zombie is left)
    wait_until(lambda: all(procfs.ppid(h) != pid for h in old), 5,
               lambda: f"old helper {old} still a child of {pid}")
    new = zap_helpers(pid)
    assert len(new) == 1 and new != old, (old, new)
    reclaimed(s, prog)
    assert prog.bad() == 0
    assert sum(c["pid"] == pid for c in s.status()["clients"]) == 1


def test_a_server_restart_is_served_through_the_helper(need_kernel, tmp_path):
    s = Server(tmp_path, swap_size="256M").start()
    prog = Program(s.socket, 1024)
    try:
        wait_client(s, prog.pid)
        reclaimed(s, prog)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        n = Server(tmp_path, swap_size="256M").start()
        s = n
        # taken over from the journal, and the helper's reconnect accepted
        assert "taken over" in n.log_text(), n.log_text()
        assert prog.bad() == 0
        wait_until(lambda: "HELLO refused" not in n.log_text() and any(
            c["pid"] == prog.pid for c in n.status()["clients"]), 10, n.log_text)
        reclaimed(n, prog)
        assert prog.bad() == 0
        assert "HELLO refused" not in n.log_text(), n.log_text()
    finally:
        prog.close()
        s.stop()


def test_a_hello_that_claims_to_be_a_helper_speaks_for_nobody(srv):
    """HELLO_HELPER moves a HELLO to the peer's parent only when the two
    share one mm. The test process is no CLONE_VM child of its parent: its
    forked-child HELLO (no fd) and its reconnect with a uffd are refused
    (EPERM), and the managed program it might have claimed is untouched."""
    s, progs = srv
    prog = Program(s.socket, 64)
    progs.append(prog)
    wait_client(s, prog.pid)
    for flags in (p.HELLO_HELPER | p.HELLO_FORKED, p.HELLO_HELPER | p.HELLO_FORKED |
                  p.HELLO_RECONNECT):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.settimeout(10)
        try:
            c.connect(s.socket)
            c.send(p.pack_hello(flags, 0, (0, 0), 0))
            reply = c.recv(4096)
        finally:
            c.close()
        assert p.header(reply)[0] == p.ERROR and p.parse_error(reply)[0] == 1, reply  # EPERM
    assert "shares no mm" in s.log_text(), s.log_text()
    assert s.client(prog.pid)["agent"]
    reclaimed(s, prog)
    assert prog.bad() == 0


def test_a_listener_of_another_uid_gets_nothing(need_kernel):
    """The agent checks who listens (SO_PEERCRED): root or the program's
    own uid. A socket served by `nobody` gets no HELLO and no uffd, and the
    program runs unmanaged, saying why in one line."""
    d = Path(tempfile.mkdtemp(prefix="uffdsrv-evil-", dir="/tmp"))  # nobody must reach it
    os.chmod(d, 0o777)
    path = str(d / "evil.sock")
    listener = textwrap.dedent(f'''
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind({path!r}); s.listen(4)
        print("listening", flush=True)
        while True:
            c, _ = s.accept()
            c.settimeout(5)
            try:
                msg, anc, _, _ = c.recvmsg(4096, 64)
            except OSError:
                msg, anc = b"", []
            print("conn", len(msg), len(anc), flush=True)
            c.close()
    ''')
    ev = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           PY, "-c", listener], stdout=subprocess.PIPE, text=True)
    try:
        assert ev.stdout.readline().strip() == "listening"
        argv, env = managed(path, [PY, "-c", "print('ran')"])
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.strip() == "ran", r
        assert "running unmanaged" in r.stderr and "uid 65534" in r.stderr, r.stderr
        seen = ev.stdout.readline().split()  # the agent connected, and sent nothing
        assert seen == ["conn", "0", "0"], seen
    finally:
        ev.kill()
        ev.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_the_helper_drops_root_with_the_program(srv):
    """Credentials are per task: a helper left as root would share memory
    with a program that dropped to nobody. It follows the program down."""
    s, progs = srv
    prog = Program(s.socket, 256)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    (helper,) = zap_helpers(prog.pid)
    prog.cmd("drop 65534")

    def ids():
        text = procfs._read(f"/proc/{helper}/status") or ""
        return [line.split()[1:4] for line in text.splitlines()
                if line.startswith(("Uid:", "Gid:"))]
    wait_until(lambda: ids() == [["65534"] * 3] * 2, 5, lambda: f"helper ids {ids()}")
    assert prog.bad() == 0
    reclaimed(s, prog)  # still zaps for the server
    assert prog.bad() == 0


@pytest.fixture
def core_dir(tmp_path):
    """Cores of this test go to tmp_path: the machine's core_pattern is set
    for the test and put back after."""
    pattern = Path("/proc/sys/kernel/core_pattern")
    old = pattern.read_text()
    d = tmp_path / "cores"
    d.mkdir()
    pattern.write_text(f"{d}/core.%p")
    try:
        yield d
    finally:
        pattern.write_text(old)


def test_a_core_dump_holds_every_reclaimed_record(srv, core_dir):
    s, progs = srv

    def cores_on():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    prog = Program(s.socket, 2048, preexec=cores_on)
    progs.append(prog)
    wait_client(s, prog.pid)
    reclaimed(s, prog)
    prog.proc.stdin.write("abort\n")
    prog.proc.stdin.flush()
    assert prog.proc.wait(timeout=60) == -signal.SIGABRT
    core = core_dir / f"core.{prog.pid}"
    wait_until(core.exists, 30, "no core written")
    data = core.read_bytes()
    missing = [i for i in range(prog.npages) if (b"UFFDSRV-REC:%08d:" % i) not in data]
    assert not missing, f"{len(missing)} of {prog.npages} records missing from the core"
