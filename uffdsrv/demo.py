"""A one-minute demo of uffdsrv: start a server, run the test workload under
it, reclaim its memory in phases and show, live, where its pages are.

    python -m uffdsrv.demo [--seconds 45] [--mib 256] [--state-dir state]

Phases: fill the workload's memory, reclaim all of it, then keep a hot set
resident (every 8th page rewritten, 64 MiB kept); a full verify follows each
phase. Exit 0 if every verify found 0 bad pages, 1 otherwise.

Memory given back is the machine's: MemFree (/proc/meminfo) gained since
the fill, shown beside the workload's resident bytes and the page cache's
growth. A program's RSS going down proves nothing by itself: pages written
to a file through the page cache only move into the kernel's cache.
"""
import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import ctl
from .cli import positive_int
from .core.pages import PAGE
from .harness import ServerError, ServerProcess
from .system import procfs

MIB = 1 << 20
PKG = os.path.dirname(os.path.abspath(__file__))


class Failure(Exception):
    pass


class Demo:
    def __init__(self, a):
        self.a, self.t0 = a, time.monotonic()
        self.sock = os.path.join(a.state_dir, "uffdsrv.sock")
        self.server = self.workload = None
        self.phase, self.last_verify, self.rss_kb = "starting", None, None
        self.verified = self.bad = self.reclaimed = 0
        self.reclaim_time = self.peak = 0.0
        self.status, self.rates, self.stopping = None, {}, threading.Event()
        self.mem_ref = self.mem = None  # /proc/meminfo after the fill, and now
        self.last_given = None

    def spawn(self, argv, log, **kw):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.dirname(PKG), os.environ.get("PYTHONPATH")])))
        with open(os.path.join(self.a.state_dir, log), "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "uffdsrv", *argv], env=env,
                                    stderr=out, start_new_session=True, **kw)

    def start(self):
        log = os.path.join(self.a.state_dir, "server.log")
        with open(log, "wb"):
            pass  # this run's log only
        self.server = ServerProcess(self.sock, os.path.join(self.a.state_dir, "swap"), 1 << 30,
                                    log_path=log)
        try:
            self.server.start(timeout=10)
        except ServerError as e:
            self.check()  # it exited: say with its last line
            raise Failure(str(e).splitlines()[0]) from None
        return self.server.status()

    def check(self):
        rc = self.server.poll()
        if rc is not None and rc < 0:
            raise Failure(f"the server was killed by signal {-rc}")
        if rc is not None:
            raise Failure(f"the server exited: {self.server.log_tail(1) or 'no output'}")

    def ask(self, line: str | None) -> list[str]:
        """One workload command (None: none, just read a line), one reply line."""
        if line is not None:
            os.write(self.workload.stdin.fileno(), line.encode() + b"\n")
        buf, fd = b"", self.workload.stdout.fileno()
        while not buf.endswith(b"\n"):
            if not select.select([fd], [], [], 0.5)[0]:
                self.check()
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise Failure(f"the workload exited (see {self.a.state_dir}/workload.log)")
            buf += chunk
        reply = buf.decode().split()
        if reply[:1] not in (["ok"], ["ready"], ["bye"]):
            raise Failure(f"workload: {line!r} -> {buf.decode().strip()!r}")
        return reply

    def stop(self) -> bool:
        """Stop what we started, by pid; True if the server exited cleanly."""
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        self.stopping.set()
        w, s = self.workload, self.server
        if w and w.poll() is None:
            try:
                os.write(w.stdin.fileno(), b"exit\n")
                w.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                w.kill()
                w.wait()
        if s is None:
            return True
        try:
            return s.stop(timeout=10) == 0
        except ServerError:
            return False

    def reclaim(self, keep: int):
        t = time.monotonic()
        r = self.server.request("reclaim", pid=self.workload.pid, keep_bytes=keep)
        self.reclaim_time += time.monotonic() - t
        self.reclaimed += r["reclaimed_bytes"] // PAGE
        self.rss_kb = int(self.ask("rss")[1])

    def verify(self):
        _, n, bad = self.ask("verify")
        self.verified, self.bad = self.verified + int(n), self.bad + int(bad)
        self.last_verify = (self.phase.split(":")[0], int(n), int(bad))
        self.rss_kb = int(self.ask("rss")[1])

    def scenario(self):
        # The server finds new mappings by rescanning /proc/PID/maps when the
        # agent connects (racing with the workload's mmap) and on reclaim: a
        # reclaim that keeps everything makes it manage the buffer before fill.
        self.server.request("reclaim", pid=self.workload.pid, keep_bytes=1 << 40)
        self.phase = f"fill: write all {self.a.mib} MiB"
        self.ask("fill 1")
        self.verify()
        # what reclaim gives back counts from here, with the workload's
        # memory in use
        self.mem = self.mem_ref = procfs.meminfo()
        end = self.t0 + self.a.seconds
        a_end = time.monotonic() + (end - time.monotonic()) * 0.35
        self.phase = "reclaim all: keep 0 MiB, hold 2 s, verify"
        while True:
            self.reclaim(0)
            time.sleep(2)
            self.verify()
            if time.monotonic() > a_end - 3:
                break
        b_end = time.monotonic() + (end - time.monotonic() - 4) * 0.85
        self.phase = "hot set: write every 8th page, keep 64 MiB"
        gen, touched = 2, time.monotonic()
        while time.monotonic() < b_end:
            self.ask(f"write {gen} 8")
            gen += 1
            if time.monotonic() - touched > 10:  # a cold scan faults everything back
                self.ask("touch")
                touched = time.monotonic()
            self.reclaim(64 * MIB)
            time.sleep(0.3)
        self.verify()
        self.phase = "final: reclaim all, verify"
        self.reclaim(0)
        time.sleep(1)
        self.mem = procfs.meminfo()
        self.last_given = self.given_back()
        self.verify()
        time.sleep(0.5)  # one more status poll for the last frame

    def watch(self, plain: bool):
        prev, printed = {}, 0.0
        while not self.stopping.wait(0.25):
            try:
                st = self.server.status()
            except ctl.ControlError:
                continue
            if self.mem_ref is not None:
                self.mem = procfs.meminfo()
            now, rates = time.monotonic(), {}
            for c in st["clients"]:
                if c["pid"] in prev:
                    t, f = prev[c["pid"]]
                    rates[c["pid"]] = (c["faults_total"] - f) / (now - t)
                prev[c["pid"]] = (now, c["faults_total"])
            self.status, self.rates = st, rates
            self.peak = max([self.peak, *rates.values()])
            if plain and now - printed >= 1:
                printed = now
                print(self.line(), flush=True)

    def verify_text(self) -> str:
        if not self.last_verify:
            return "none yet"
        phase, n, bad = self.last_verify
        return f"{n} pages, {bad} bad ({phase})"

    def given_back(self) -> tuple[int, int] | None:
        """(MemFree gained, page cache growth) since the fill, in bytes."""
        if self.mem_ref is None or self.mem is None:
            return None
        return (self.mem.get("MemFree", 0) - self.mem_ref.get("MemFree", 0),
                self.mem.get("Cached", 0) - self.mem_ref.get("Cached", 0))

    def memory_text(self) -> str:
        g = self.given_back()
        if g is None:
            return "- (counted from the end of the fill)"
        return f"MemFree {g[0] / MIB:+.0f} MiB, page cache {g[1] / MIB:+.0f} MiB since the fill"

    def line(self) -> str:
        parts = [f"[{time.monotonic() - self.t0:3.0f}s] {self.phase.split(':')[0]:<11}"]
        for c in self.status["clients"]:
            parts.append(f"pid {c['pid']} resident {c['resident_bytes'] / MIB:.0f} "
                         f"swapped {c['swapped_bytes'] / MIB:.0f} MiB "
                         f"faults/s {self.rates.get(c['pid'], 0):.0f}")
        if self.rss_kb is not None:
            parts.append(f"VmRSS {self.rss_kb / 1024:.0f} MiB")
        g = self.given_back()
        if g is not None:
            parts.append(f"given back {g[0] / MIB:+.0f} MiB (page cache {g[1] / MIB:+.0f})")
        parts.append(f"verify: {self.verify_text()}")
        return " | ".join(parts)

    def view(self):
        head = Text.assemble(("uffdsrv demo", "bold"), f"  {time.monotonic() - self.t0:.0f}"
                             f"/{self.a.seconds} s\nphase  ", (self.phase, "cyan"))
        t = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("PID", "COMM", "MANAGED", "RESIDENT", "SWAPPED", "", "FAULTS/s"):
            t.add_column(col, justify="left" if col in ("COMM", "") else "right")
        st = self.status or {"clients": [], "swap": None}
        for c in st["clients"]:
            m = max(c["managed_bytes"], 1)
            r, s = (round(16 * c[k] / m) for k in ("resident_bytes", "swapped_bytes"))
            bar = Text.assemble(("█" * r, "green"), ("█" * s, "blue"),
                                ("·" * (16 - r - s), "dim"))
            t.add_row(str(c["pid"]), c["comm"][:10],
                      *(f"{c[k] / MIB:.1f}" for k in ("managed_bytes", "resident_bytes",
                                                       "swapped_bytes")),
                      bar, f"{self.rates.get(c['pid'], 0):,.0f}")
        sw = st["swap"]
        lines = [
            Text.assemble("MiB; bar: ", ("resident", "green"), " / ", ("swapped", "blue")),
            f"swap file  {sw['used_bytes'] / MIB:.1f} of {sw['size_bytes'] / MIB:.0f} MiB used"
            if sw else "swap file  -",
            "workload VmRSS  " + (f"{self.rss_kb / 1024:.1f} MiB" if self.rss_kb else "-")
            + "  (rss, after each step)",
            "given back to the machine  " + self.memory_text() + "  (machine-wide)",
            Text("last verify  " + self.verify_text(),
                 style="red" if self.last_verify and self.last_verify[2] else "green"),
            f"reclaimed  {self.reclaimed * PAGE / MIB:.0f} MiB in {self.reclaim_time:.2f} s",
        ]
        return Group(head, "", t, "", *lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uffdsrv.demo", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=positive_int, default=45)
    p.add_argument("--mib", type=positive_int, default=256)
    p.add_argument("--state-dir", default="state")
    a = p.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/userfaultfd"):
        why = "must run as root" if os.geteuid() else "/dev/userfaultfd is missing"
        print(f"uffdsrv demo: {why}", file=sys.stderr)
        return 1
    if not os.path.exists(os.path.join(PKG, "_bin", "workload")):
        print("uffdsrv demo: the native parts are not built (run make native)", file=sys.stderr)
        return 1
    a.state_dir = os.path.abspath(a.state_dir)
    os.makedirs(a.state_dir, mode=0o700, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    d, console, clean = Demo(a), Console(), False
    plain = not console.is_terminal
    try:
        d.status = d.start()
        cmd = [os.path.join(PKG, "_bin", "workload"), "--mib", str(a.mib), "--threads", "2"]
        d.workload = d.spawn(["run", "--socket", d.sock, "--", *cmd], "workload.log",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        d.ask(None)  # "ready <addr> <npages>"
        threading.Thread(target=d.watch, args=(plain,), daemon=True).start()
        if plain:
            d.scenario()
            print(d.line(), flush=True)
        else:
            with Live(get_renderable=d.view, console=console, refresh_per_second=4):
                d.scenario()
        d.ask("exit")
        d.workload.wait(5)
        clean = d.stop()
    except KeyboardInterrupt:
        d.stop()
        print("uffdsrv demo: interrupted; stopped the workload and the server", file=sys.stderr)
        return 130
    except Exception as e:
        d.stop()
        print(f"uffdsrv demo: {e or type(e).__name__}", file=sys.stderr)
        return 1
    rate = d.reclaimed / d.reclaim_time if d.reclaim_time else 0
    print(f"verified {d.verified} pages, {d.bad} bad\npeak fault rate {d.peak:,.0f} faults/s\n"
          f"reclaimed {d.reclaimed} pages at {rate:,.0f} pages/s")
    if d.last_given is not None:
        print(f"given back to the machine after the last reclaim: MemFree "
              f"{d.last_given[0] / MIB:+.0f} MiB, page cache {d.last_given[1] / MIB:+.0f} MiB "
              f"(the workload's {a.mib} MiB against the end of the fill; MemFree is the "
              f"whole machine's, so other programs' memory moves it too)")
    if not clean:
        print("uffdsrv demo: the server did not stop cleanly "
              f"(see {a.state_dir}/server.log)", file=sys.stderr)
    return 0 if d.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
