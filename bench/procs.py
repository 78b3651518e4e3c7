"""The processes a benchmark drives.

Everything started here is registered in `STARTED` and stopped, by pid, in
`cleanup()`; what the kernel side enables (bench/kernel.py: a swap file, a
memory cgroup) is registered in `RESOURCES` and closed there too, after the
processes, last in first out. `install_signal_handlers()` turns SIGTERM
into an exception so that all of it runs on SIGINT and SIGTERM too.
Nothing is left behind: no process, no swap, no cgroup, no file outside the
run's temporary directory.
"""
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uffdsrv import ctl
from uffdsrv.harness import ServerError, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "uffdsrv" / "_bin"
PY = sys.executable
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

STARTED: list[subprocess.Popen] = []
RESOURCES: list = []  # each has close(); see bench/kernel.py


class BenchError(Exception):
    pass


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGINT raises KeyboardInterrupt already; make SIGTERM raise too, so
    that every `finally` (swapoff above all) runs."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def cleanup() -> None:
    """Stops every process we started (by pid), then closes every cgroup
    and swap we made. Safe to call twice; signals are held off meanwhile."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while STARTED:
            stop(STARTED.pop())
        while RESOURCES:
            RESOURCES.pop().close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def popen(argv, **kw) -> subprocess.Popen:
    # A session of their own: a terminal's ^C reaches us only, and we stop
    # them in order (the server last, after its clients).
    p = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, **kw)
    STARTED.append(p)
    return p


def cpu_seconds(pid: int, skip_comm: str = "faulter-busy") -> float:
    """CPU time of the threads of pid, in seconds, except those named
    skip_comm (the workload's busy threads, which are not the cost of a
    reclaim): the sum of the first field of each thread's schedstat (ns),
    which is precise; utime+stime from /proc/PID/stat (clock ticks) where
    schedstat is missing."""
    total, seen = 0, False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() == skip_comm:
                        continue
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                    seen = True
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return 0.0
    if seen:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    """`python -m uffdsrv serve` through uffdsrv.harness.ServerProcess (the
    one way tests, demo and bench start a server), its socket and swap file
    in tmp. Status is polled over the harness's kept connection, in this
    process."""

    def __init__(self, tmp: Path, swap_bytes: int, zap_mode: str = "process_madvise",
                 policy: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="server-", dir=tmp))
        self.socket = str(self.dir / "uffdsrv.sock")
        self.log = self.dir / "server.log"
        extra = ["--zap-mode", zap_mode, "--log-level", "warning"]
        if policy:
            extra += ["--policy", policy]
        self.harness = ServerProcess(self.socket, str(self.dir / "swap"), swap_bytes,
                                     extra_args=extra, log_path=str(self.log))

    def __enter__(self):
        try:
            self.harness.start(timeout=30)
        except ServerError as e:
            raise BenchError(f"uffdsrv serve: {e}") from None
        finally:
            if self.harness.proc is not None:
                STARTED.append(self.harness.proc)  # cleanup() stops it after its clients
        return self

    def __exit__(self, *exc):
        try:
            self.harness.stop(timeout=60)
        except ServerError as e:
            print(f"bench: {e}", file=sys.stderr)
        finally:
            if self.harness.proc in STARTED:
                STARTED.remove(self.harness.proc)

    @property
    def pid(self) -> int:
        return self.harness.pid

    def status(self) -> dict:
        try:
            return self.harness.status()
        except ctl.ControlError as e:
            raise BenchError(f"uffdsrv status: {e}{self._log()}") from None

    def request(self, cmd: str, timeout: float = 120, **fields) -> dict:
        try:
            return ctl.request(self.socket, cmd, timeout=timeout, **fields)
        except ctl.ControlError as e:
            raise BenchError(f"uffdsrv {cmd}: {e}{self._log()}") from None

    def _log(self) -> str:
        """The end of the server's log, for an error that may be its fault."""
        tail = self.harness.log_tail(12)
        return f"\n--- {self.log} ---\n{tail}" if tail else ""

    def wait_client(self, pid: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c["pid"] == pid for c in self.status()["clients"]):
                return
            time.sleep(0.05)
        raise BenchError(f"pid {pid} never connected to the server")

    def reclaim(self, pid: int, timeout: float = 120) -> int:
        return self.request("reclaim", timeout=timeout, pid=pid,
                            keep_bytes=0)["reclaimed_bytes"]

    def client(self, pid: int) -> dict:
        """The client's entry of `status --json`."""
        for c in self.status()["clients"]:
            if c["pid"] == pid:
                return c
        raise BenchError(f"pid {pid} is not a client of the server")

    def limit(self, pid: int, nbytes: int | None) -> None:
        """`uffdsrv limit --pid PID --bytes N`: the budget the server holds it at."""
        self.request("limit", timeout=30, pid=pid, bytes=nbytes)

    def wait_for(self, pid: int, what: str, ok, timeout: float = 30) -> dict:
        """Polls the client's status until ok(status) holds."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.client(pid)
            if ok(c):
                return c
            if time.monotonic() > deadline:
                raise BenchError(f"pid {pid}: {what} not reached in {timeout:.0f} s: {c}")
            time.sleep(0.05)


class Faulter:
    """native/bench/faulter.c: one command line in, one answer line out;
    under the agent (`uffdsrv run`) when a server socket is given; inside a
    memory cgroup from its first page on when `cgroup` (the group's
    cgroup.procs) is given. Either way the pid is the faulter's own: both
    wrappers exec it."""

    def __init__(self, mib: int, stride: int = 1, socket: str | None = None, seed: int = 1,
                 busy: int = 0, cgroup: str | None = None):
        cmd = [str(BIN / "faulter"), "--mib", str(mib), "--stride", str(stride),
               "--seed", str(seed), "--busy", str(busy)]
        if socket:
            cmd = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--", *cmd]
        if cgroup:
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup, *cmd]
        self.proc = popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise BenchError(f"faulter did not start: {ready} {self.proc.stderr.read()}")
        self.addr, self.npages, self.nfilled = int(ready[1], 16), int(ready[2]), int(ready[3])
        self.pid = self.proc.pid
        self.gen = 1

    def cmd(self, line: str, timeout: float = 300) -> list[str]:
        """One command, one answer line. A fault the server never serves
        would block the faulter for ever: give up after timeout seconds."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        # The faulter writes one line per command and then waits: nothing is
        # left in our read buffer between answers, so select() sees it all.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"faulter: no answer to {line!r} in {timeout:.0f} s")
        out = self.proc.stdout.readline().split()
        if not out or out[0] not in ("ok", "bye"):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise BenchError(f"faulter: {line!r} -> {' '.join(out)!r} {err}")
        return out[1:]

    def refill(self) -> None:
        self.gen += 1
        self.cmd(f"fill {self.gen}")

    def fault(self, pattern: str, threads: int) -> dict:
        """The timed walk. faulter_sys_s is the faulter's own system time
        meanwhile; handler_cpu_s the C reference handler's CPU time (0
        without one)."""
        o = self.cmd(f"fault {pattern} {threads}")
        wall, pages, faults = float(o[0]), int(o[1]), int(o[2])
        r = {"pages": pages, "faults": faults, "seconds": wall,
             "pages_per_s": pages / wall if wall > 0 else float("nan"),
             "p50_us": int(o[3]) / 1e3, "p99_us": int(o[4]) / 1e3,
             "access_p50_us": int(o[5]) / 1e3, "access_p99_us": int(o[6]) / 1e3,
             "bad_pages": int(o[7]), "faulter_sys_s": int(o[8]) / 1e9,
             "handler_cpu_s": int(o[9]) / 1e9}
        if r["bad_pages"]:
            raise BenchError(f"{r['bad_pages']} pages read back wrong after fault-in")
        return r

    def swapstat(self) -> tuple[int, int, int]:
        """(pages swapped out, of which still in the swap cache, pages present)."""
        o = self.cmd("swapstat")
        return int(o[0]), int(o[1]), int(o[2])

    def refreclaim(self, path) -> dict:
        """The C reference's reclaim: the buffer written to path, zapped,
        and a refhandler started to serve it."""
        o = self.cmd(f"refreclaim {path}")
        return {"reclaim_s": float(o[0]), "handler_pid": int(o[1]), "io_mode": o[2]}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError, OSError, ValueError):
                self.cmd("exit", timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc in STARTED:
            STARTED.remove(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PolicyLoad:
    """native/bench/policyload.c under the agent: fills its pages, says
    `ready`, then runs its warm-up and its measured accesses, one stdin line
    each."""

    def __init__(self, socket: str, mib: int, pattern: str, accesses: int, warmup: int,
                 seed: int, write_fraction: float = 0.1):
        cmd = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--",
               str(BIN / "policyload"), "--mib", str(mib), "--pattern", pattern,
               "--accesses", str(accesses), "--warmup", str(warmup), "--seed", str(seed),
               "--write-fraction", str(write_fraction)]
        self.proc = popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        ready = self._line("ready")
        self.addr, self.npages = int(ready[0], 16), int(ready[1])
        self.pid = self.proc.pid

    def _line(self, want: str) -> list[str]:
        out = self.proc.stdout.readline().split()
        if not out or out[0] != want:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise BenchError(f"policyload: wanted {want!r}, got {' '.join(out)!r} {err}")
        return out[1:]

    def go(self, want: str) -> list[str]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._line(want)

    def warm(self) -> dict:
        o = self.go("warm")
        return {"seconds": float(o[0]), "accesses": int(o[1]), "mismatches": int(o[2])}

    def run(self) -> dict:
        o = self.go("done")
        return {"seconds": float(o[0]), "accesses": int(o[1]), "checksum": int(o[2]),
                "mismatches": int(o[3])}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                stop(self.proc)
        if self.proc in STARTED:
            STARTED.remove(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def zapbench(memory: str, busy: int, ranges: int, rounds: int, vlens) -> list[dict]:
    p = popen([str(BIN / "zapbench"), "--memory", memory, "--busy", str(busy),
               "--ranges", str(ranges), "--rounds", str(rounds),
               "--vlen", ",".join(map(str, vlens))],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        stop(p)
        STARTED.remove(p)
    if p.returncode != 0:
        raise BenchError(f"zapbench --memory {memory} --busy {busy}: {err.strip()}")
    return [json.loads(line) for line in out.splitlines() if line.strip()]
