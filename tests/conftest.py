"""Shared fixtures: a real server process, and real workloads run under the
agent. Integration tests need root and the kernel interfaces; they skip,
saying why, where those are missing."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from uffdsrv.core.budgets import parse_size
from uffdsrv.harness import ServerError, ServerProcess

from .support import wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "uffdsrv" / "_bin" / "workload"
PY = sys.executable


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="run the soak test for 10 minutes instead of a short CI run")


def kernel_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (process_vm_readv, pidfd_getfd, /dev/userfaultfd)"
    if not os.path.exists("/dev/userfaultfd"):
        return "the kernel has no /dev/userfaultfd"
    return None


@pytest.fixture(scope="session")
def need_kernel():
    why = kernel_missing()
    if why:
        pytest.skip(why)


def uffdsrv(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", "uffdsrv", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"uffdsrv {' '.join(args)} failed: {r.stderr.strip()}")
    return r


# Every Server a test made: when the test (or the module, for a server of a
# module-scoped fixture) ends, one still running is killed and its swap file
# is removed, passed or failed. The server allocates its swap file's blocks
# at start (fallocate), so a suite's worth of 1 GiB files left in pytest's
# kept temp dirs fills the disk (it did: 77 GB).
_SERVERS: list["Server"] = []


def _clean_servers_since(start: int) -> None:
    while len(_SERVERS) > start:
        s = _SERVERS.pop()
        if s.poll() is None and s.proc is not None:
            s.kill()
        try:
            if os.path.isfile(s.swap):  # a block device given as swap stays
                os.unlink(s.swap)
        except OSError:
            pass


@pytest.fixture(autouse=True, scope="module")
def _remove_swap_files_of_the_module():
    start = len(_SERVERS)
    yield
    _clean_servers_since(start)


@pytest.fixture(autouse=True)
def _remove_swap_files():
    start = len(_SERVERS)
    yield
    _clean_servers_since(start)


class Server(ServerProcess):
    """A server whose socket, swap file and log live in `tmp`, with the
    helpers tests use. A restart is a new Server on the same directory."""

    def __init__(self, tmp: Path, swap_size: str = "1G", extra=(), swap: str | None = None,
                 state_dir: str | None = None):
        self.dir = Path(tmp)
        self.log = self.dir / "server.log"
        super().__init__(str(self.dir / "uffdsrv.sock"), swap or str(self.dir / "swap"),
                         parse_size(swap_size), state_dir=state_dir, extra_args=extra,
                         log_path=str(self.log))
        _SERVERS.append(self)

    def start(self, timeout: float = 20) -> "Server":
        try:
            super().start(timeout)
        except ServerError as e:
            raise AssertionError(f"{e}\n{self.log_text()}") from None
        return self

    def client(self, pid: int) -> dict:
        for c in self.status()["clients"]:
            if c["pid"] == pid:
                return c
        raise AssertionError(f"pid {pid} is not a client")

    def reclaim(self, pid: int, keep: int = 0) -> int:
        return self.request("reclaim", pid=pid, keep_bytes=keep)["reclaimed_bytes"]

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        try:
            return super().stop(timeout, sig)
        except ServerError as e:
            raise AssertionError(str(e)) from None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def server(need_kernel, tmp_path):
    s = Server(tmp_path).start()
    yield s
    code = s.stop()
    log = s.log_text()
    assert "Traceback" not in log, log
    assert code == 0, log


class Workload:
    """native/tools/workload.c under the agent: one command line in, one
    answer line out."""

    def __init__(self, socket: str, mib: int = 64, threads: int = 4, seed: int = 1,
                 managed: bool = True):
        cmd = [str(WORKLOAD), "--mib", str(mib), "--threads", str(threads), "--seed", str(seed)]
        ready = self._spawn(socket if managed else None, cmd)
        self.addr, self.npages = int(ready[1], 16), int(ready[2])

    def _spawn(self, socket: str | None, cmd: list[str]) -> list[str]:
        """Start cmd (under `uffdsrv run` if socket is given); -> the words
        of its first line, which must begin with "ready"."""
        if socket is not None:
            cmd = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", (ready, self.proc.stderr.read())
        self.pid = self.proc.pid
        return ready

    def cmd(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline().strip()
        assert out, f"workload died on {line!r}: {self.proc.stderr.read()}"
        return out

    def verify(self) -> tuple[int, int]:
        ok, n, bad = self.cmd("verify").split()
        assert ok == "ok"
        return int(n), int(bad)

    def rss_kib(self) -> int:
        return int(self.cmd("rss").split()[1])

    def close(self):
        """Ask it to exit; kill it if it cannot (a test that failed may
        leave it waiting on a fault that no server will serve)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workload(server):
    made = []

    def make(**kw):
        w = Workload(server.socket, **kw)
        made.append(w)
        wait_client(server, w.pid)
        return w
    yield make
    for w in made:
        w.close()


def wait_client(server: Server, pid: int, timeout: float = 10) -> dict:
    return wait_until(lambda: next((c for c in server.status()["clients"] if c["pid"] == pid),
                                   None),
                      timeout, lambda: f"pid {pid} never connected: {server.log_text()}")
