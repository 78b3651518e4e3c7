"""stress-ng, plain and under the agent: what being managed costs a program
that maps, frees and forks all the time.

Every munmap, MADV_DONTNEED and fork of a managed program raises a uffd
event (UNMAP, REMOVE, FORK), and the thread that raised it waits until the
server has read it; so a stressor's bogo-ops/s under `uffdsrv run`, over
the same stressor plain, is the price of that wait (and of the server's
CPU, on a 2-CPU machine). stress-ng forks one worker per instance, and
every worker carries the agent (LD_PRELOAD is inherited; the agent's
atfork handler reconnects the child), so each worker is a client of its
own.

`--metrics-brief` prints, on stderr, one row per stressor:

    stress-ng: metrc: [PID] malloc   66073   2.04   0.20   1.37   32451.32   41943.57

bogo ops, real, user and system seconds, bogo-ops/s over real time and
over user+system time. The real-time rate is the one compared.
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import procs
from .procs import PY, BenchError

MMAP_BYTES = "4M"  # the mmap stressor maps 256 MiB per instance by default


def available() -> str | None:
    return shutil.which("stress-ng")


def parse_metrics(text: str, stressor: str) -> dict:
    for line in text.splitlines():
        if "metrc:" not in line:
            continue
        parts = line.split("]", 1)[-1].split()
        if len(parts) >= 6 and parts[0] == stressor:
            try:
                ops, real, usr, sys_ = (float(x) for x in parts[1:5])
                rate = float(parts[5])
            except ValueError:
                continue
            return {"bogo_ops": ops, "real_s": real, "usr_s": usr, "sys_s": sys_,
                    "ops_per_s": rate}
    raise BenchError(f"stress-ng --{stressor}: no metrics row in its output: "
                     f"{text.strip()[-1500:]!r}")


class StressNg:
    """One `stress-ng --STRESSOR N --timeout S` run, its output in tmp;
    under `uffdsrv run` when a server socket is given."""

    def __init__(self, stressor: str, instances: int, seconds: float, tmp: Path,
                 socket: str | None = None):
        if not available():
            raise BenchError("stress-ng is not installed (apt-get install stress-ng; "
                             "make setup installs it)")
        self.stressor, self.seconds = stressor, seconds
        self.out = Path(tmp) / f"stress-{stressor}-{'managed' if socket else 'plain'}.log"
        argv = ["stress-ng", f"--{stressor}", str(instances), "--timeout", f"{seconds:g}s",
                "--metrics-brief", "--temp-path", str(tmp)]
        if stressor == "mmap":
            argv += ["--mmap-bytes", MMAP_BYTES]
        if socket:
            argv = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--", *argv]
        self.managed = socket is not None
        with open(self.out, "wb") as out:
            self.proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, grace: float = 60) -> dict:
        """Waits for the timeout to end it; -> its metrics."""
        try:
            self.proc.wait(self.seconds + grace)
        except subprocess.TimeoutExpired:
            self.close()
            raise BenchError(f"stress-ng --{self.stressor} "
                             f"({'managed' if self.managed else 'plain'}) did not end "
                             f"{grace:.0f} s after its --timeout") from None
        finally:
            self._forget()
        text = self.out.read_text(errors="replace")
        if self.proc.returncode != 0:
            raise BenchError(f"stress-ng --{self.stressor} exited with {self.proc.returncode}: "
                             f"{text.strip()[-1500:]}")
        return parse_metrics(text, self.stressor)

    def close(self) -> None:
        """SIGINT, which stress-ng passes on to its workers; then SIGKILL to
        the session we started it in (the workers are in its process group,
        and a managed worker stuck in a fault ignores signals until served)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self._kill_session()
        self._forget()

    def kill(self) -> None:
        """SIGKILL to its whole session at once: a managed program whose
        memory was just reclaimed would otherwise fault most of it back in
        while it frees everything on the way out (seconds, and not what is
        measured)."""
        if self.proc.poll() is None:
            self._kill_session()
        self._forget()

    def _kill_session(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _forget(self) -> None:
        if self.proc in procs.STARTED:
            procs.STARTED.remove(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def watch(srv, stress: StressNg, interval: float = 0.25) -> dict:
    """Polls the server while a managed run goes on: which stress-ng
    processes it managed, and at most how much. A run whose agent never
    connected would look free; this shows it was not."""
    seen, peak = set(), 0
    while stress.running():
        try:
            clients = [c for c in srv.status()["clients"] if c["comm"].startswith("stress-ng")]
        except BenchError:
            clients = []
        seen |= {c["pid"] for c in clients}
        peak = max(peak, sum(c["managed_bytes"] for c in clients))
        time.sleep(interval)
    return {"clients_seen": len(seen), "managed_bytes_peak": peak}
