"""The processes a benchmark drives, and the kernel swap it may enable.

Everything started here is registered in `STARTED` and stopped, by pid, in
`cleanup()`; the kernel swap file is swapped off and deleted in
`KernelSwap.__exit__`, and `install_signal_handlers()` turns SIGTERM into an
exception so that both run on SIGINT and SIGTERM too. Nothing is left
behind: no process, no swap, no file outside the run's temporary directory.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uffdsrv.cli import UsageError, request

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "uffdsrv" / "_bin"
PY = sys.executable
PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

STARTED: list[subprocess.Popen] = []
SWAPS: list["KernelSwap"] = []


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
    """Stops every process we started (by pid), then every swap we enabled.
    Safe to call twice; signals are held off meanwhile."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while STARTED:
            stop(STARTED.pop())
        while SWAPS:
            SWAPS.pop().off()
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
    """`python -m uffdsrv serve`, its socket and swap file in tmp."""

    def __init__(self, tmp: Path, swap_bytes: int, zap_mode: str = "process_madvise",
                 policy: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="server-", dir=tmp))
        self.socket = str(self.dir / "uffdsrv.sock")
        self.log = self.dir / "server.log"
        self.args = ["serve", "--socket", self.socket, "--swap", str(self.dir / "swap"),
                     "--swap-size", str(swap_bytes), "--zap-mode", zap_mode,
                     "--log-level", "warning"]
        if policy:
            self.args += ["--policy", policy]
        self.proc = None

    def __enter__(self):
        with open(self.log, "ab") as log:
            self.proc = popen([PY, "-m", "uffdsrv", *self.args], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"uffdsrv serve exited: {self.log.read_text()[-2000:]}")
            if os.path.exists(self.socket):
                try:
                    request(self.socket, {"cmd": "status"}, timeout=2)
                    return self
                except UsageError:
                    pass
            time.sleep(0.05)
        raise BenchError("uffdsrv serve did not come up in 30 s")

    def __exit__(self, *exc):
        stop(self.proc, timeout=60)
        if self.proc in STARTED:
            STARTED.remove(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        return request(self.socket, {"cmd": "status"}, timeout=30)

    def wait_client(self, pid: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c["pid"] == pid for c in self.status()["clients"]):
                return
            time.sleep(0.05)
        raise BenchError(f"pid {pid} never connected to the server")

    def reclaim(self, pid: int) -> int:
        return request(self.socket, {"cmd": "reclaim", "pid": pid, "keep_bytes": 0},
                       timeout=600)["reclaimed_bytes"]

    def client(self, pid: int) -> dict:
        """The client's entry of `status --json`."""
        for c in self.status()["clients"]:
            if c["pid"] == pid:
                return c
        raise BenchError(f"pid {pid} is not a client of the server")

    def limit(self, pid: int, nbytes: int | None) -> None:
        """`uffdsrv limit --pid PID --bytes N`: the budget the server holds it at."""
        request(self.socket, {"cmd": "limit", "pid": pid, "bytes": nbytes}, timeout=30)

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
    under the agent (`uffdsrv run`) when a server socket is given."""

    def __init__(self, mib: int, stride: int = 1, socket: str | None = None, seed: int = 1,
                 busy: int = 0):
        cmd = [str(BIN / "faulter"), "--mib", str(mib), "--stride", str(stride),
               "--seed", str(seed), "--busy", str(busy)]
        if socket:
            cmd = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--", *cmd]
        self.proc = popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise BenchError(f"faulter did not start: {ready} {self.proc.stderr.read()}")
        self.addr, self.npages, self.nfilled = int(ready[1], 16), int(ready[2]), int(ready[3])
        self.pid = self.proc.pid
        self.gen = 1

    def cmd(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline().split()
        if not out or out[0] not in ("ok", "bye"):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise BenchError(f"faulter: {line!r} -> {' '.join(out)!r} {err}")
        return out[1:]

    def refill(self) -> None:
        self.gen += 1
        self.cmd(f"fill {self.gen}")

    def fault(self, pattern: str, threads: int) -> dict:
        o = self.cmd(f"fault {pattern} {threads}")
        wall, pages, faults = float(o[0]), int(o[1]), int(o[2])
        r = {"pages": pages, "faults": faults, "seconds": wall,
             "pages_per_s": pages / wall if wall > 0 else float("nan"),
             "p50_us": int(o[3]) / 1e3, "p99_us": int(o[4]) / 1e3,
             "access_p50_us": int(o[5]) / 1e3, "access_p99_us": int(o[6]) / 1e3,
             "bad_pages": int(o[7])}
        if r["bad_pages"]:
            raise BenchError(f"{r['bad_pages']} pages read back wrong after fault-in")
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError, OSError, ValueError):
                self.cmd("exit")
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


class KernelSwap:
    """A swap file under tmp (same filesystem as the server's swap file),
    just big enough, enabled for the duration of a `with` block. Off and
    deleted on the way out, whatever happens; `cleanup()` catches it too.
    Only the benchmark's own buffer is ever paged out (MADV_PAGEOUT on that
    buffer): nothing else on the machine is under memory pressure."""

    def __init__(self, tmp: Path, nbytes: int):
        self.dir = Path(tempfile.mkdtemp(prefix="kswap-", dir=tmp))
        self.path = self.dir / "swapfile"
        self.nbytes = (nbytes + 4 * MIB) // PAGE * PAGE  # + header and slack
        self.on = False

    def __enter__(self):
        existing = swaps()
        if existing:
            raise BenchError(f"swap is already enabled on this machine ({existing}); the "
                             "kernel-swap comparison needs to own the only swap")
        SWAPS.append(self)
        # swapon refuses files with holes: write every block
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            chunk = bytes(MIB)
            for _ in range(self.nbytes // MIB):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        run(["mkswap", str(self.path)])
        run(["swapon", str(self.path)])
        self.on = True
        return self

    def off(self) -> None:
        if self.on:
            r = subprocess.run(["swapoff", str(self.path)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"bench: swapoff {self.path} failed: {r.stderr.strip()}",
                      file=sys.stderr)
            else:
                self.on = False
        if not self.on:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.dir.rmdir()

    def __exit__(self, *exc):
        self.off()
        if self in SWAPS:
            SWAPS.remove(self)


def swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:] if line.strip()]


def run(argv) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


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
