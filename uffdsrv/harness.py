"""One way to start a server from Python: for the tests, the demo and the
benchmark.

    with ServerProcess(sock, swap, 256 << 20, log_path=log) as s:
        s.status()["clients"]
        s.request("reclaim", pid=pid, keep_bytes=0)

`start` spawns `python -m uffdsrv serve` in a session of its own (a Ctrl-C
meant for the caller must not reach the server before the caller has
stopped its programs: a server that dies first leaves their faults
waiting) and returns once the socket answers `status`. The figures are read
over a kept control connection, in this process: spawning the CLI per poll
cost ~120 ms each.

A server stops on SIGTERM after it has put its programs' pages back; one
that does not exit in time is killed and the stop raises, so a hang is
never mistaken for a clean stop.
"""
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from . import ctl

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerError(RuntimeError):
    """The server did not come up, exited, or did not stop."""


class ServerProcess:
    """`python -m uffdsrv serve` as a child process.

    env: variables added to (or overriding) this process's environment.
    log_path: the server's stdout and stderr, appended; None: inherited."""

    def __init__(self, socket: str, swap: str, swap_size: int, state_dir: str | None = None,
                 extra_args: Sequence[str] = (), log_path: str | None = None,
                 env: dict | None = None):
        self.socket, self.swap, self.swap_size = str(socket), str(swap), int(swap_size)
        self.state_dir = None if state_dir is None else str(state_dir)
        self.extra_args = [str(a) for a in extra_args]
        self.log_path = None if log_path is None else str(log_path)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._conn = ctl.Connection(self.socket, timeout=120)

    @property
    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "uffdsrv", "serve", "--socket", self.socket,
                "--swap", self.swap, "--swap-size", str(self.swap_size)]
        if self.state_dir is not None:
            args += ["--state-dir", self.state_dir]
        return args + self.extra_args

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("the server was not started")
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs (or was never started)."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, errors="replace") as f:
                return "\n".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 10) -> "ServerProcess":
        if self.proc is not None and self.proc.poll() is None:
            raise ServerError(f"the server on {self.socket} is already running")
        env = dict(os.environ, **self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PKG_PARENT, env.get("PYTHONPATH")]))
        out = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out if out else subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True)
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
                raise ServerError(f"the server {how}: {self.log_tail() or 'no output'}")
            try:
                ctl.request(self.socket, "status", timeout=2)
                return self
            except ctl.Unreachable:
                pass  # not bound yet, or a dead server's socket file
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"the server did not answer on {self.socket} within "
                                  f"{timeout} s: {self.log_tail() or 'no output'}")
            time.sleep(0.05)

    def status(self) -> dict:
        """`status` over the kept connection."""
        return self._conn.request("status")

    def request(self, cmd: str, **fields) -> dict:
        """One request on a connection of its own, so a long one (reclaim)
        never holds up status() from another thread."""
        return ctl.request(self.socket, cmd, timeout=600, **fields)

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> int:
        """Ask it to stop (SIGTERM: it puts every page back first) and wait;
        -> its exit code. Raises ServerError, after killing it, if it did
        not exit within timeout seconds."""
        self._conn.close()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(f"the server (pid {self.proc.pid}) did not stop within "
                                  f"{timeout} s; killed it") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; the journal is what the next one reads."""
        self._conn.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        except ServerError:
            if exc[0] is None:
                raise
