"""python -m bench budget: at the same memory budget, does a program run
faster or slower under uffdsrv than under the kernel's own swap?

Each workload runs once unlimited (`none`), then held at 25% and at 50% of
its memory by each contender:

  kernel-swap     a v1 memory cgroup limit (memory.limit_in_bytes) over a
                  swap file in the run's directory
  kernel-zswap    the same, with zswap on (lzo-rle: this kernel's crypto
                  has lzo, lzo-rle and deflate, not lz4)
  uffdsrv-disk    the server's swap file only, `uffdsrv limit` on the program
  uffdsrv-tiered  the same with `--ram-tier`: program budget + pool cap =
                  the budget (POOL_SHARE of it goes to the pool)

The budget is a share of the program's whole footprint: its memory
cgroup's usage once loaded, in the `none` row (data, heap, stack, its own
file pages). The kernel is limited to exactly that; the server limits only
the memory it manages, so its program budget is the budget minus what the
program has outside managed mappings (its cgroup's usage minus its managed
resident bytes, measured in the same row) minus the pool cap.

Every program runs in a memory cgroup of its own (unlimited but for the
kernel rows), started there before its first page, so `usage` is its own.
Same data and access sequence (seed) in every row; the swap files all live
in the run's directory (one device); the page cache is dropped before each
row so that every program's own file pages are charged to its group alike.
Rows: {"bench": "budget", "workload", "budget", "method", "ops_per_s",
"p99_us", "major_faults", "memory_bytes", "compression_ratio", "extra"}.
"""
import contextlib
import random
import select
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from uffdsrv.core.pages import PAGE

from . import kernel
from .procs import BIN, MIB, PY, ROOT, STARTED, BenchError, Server, cpu_seconds, popen, stop

WORKLOADS = ("zipf", "redis")
BUDGETS = (0.25, 0.5)
METHODS = ("none", "kernel-swap", "kernel-zswap", "uffdsrv-disk", "uffdsrv-tiered")
POOL_SHARE = 0.25  # of the budget, for the RAM tier's cap in uffdsrv-tiered
SEED = 42
ZSWAP_COMPRESSOR = "lzo-rle"
SKIPPED: list[str] = []


@dataclass
class Plan:
    # the full run in <= 10 minutes at today's rates (uffdsrv-disk: ~15k
    # Zipf accesses/s and ~2-3k GETs/s at 25%)
    zipf_mib: int = 256
    zipf_accesses: int = 300_000
    zipf_warmup: int = 60_000
    redis_mib: int = 192        # of values
    redis_requests: int = 30_000
    redis_warmup: int = 6_000
    redis_clients: int = 8
    pool_share: float = POOL_SHARE

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(zipf_mib=128, zipf_accesses=20_000, zipf_warmup=6_000, redis_mib=32,
                       redis_requests=2_000, redis_warmup=500)
        return cls()


def steps(plan: Plan) -> int:
    return len(WORKLOADS) * (1 + len(BUDGETS) * (len(METHODS) - 1))


def tier_missing() -> str | None:
    """Why uffdsrv-tiered cannot run: the server has no --ram-tier yet."""
    r = subprocess.run([PY, "-m", "uffdsrv", "serve", "--help"], cwd=ROOT, capture_output=True,
                       text=True)
    return None if "--ram-tier" in r.stdout else "uffdsrv serve has no --ram-tier option"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_caches() -> None:
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


class Sampler:
    """Calls fn() every 50 ms in a thread while the `with` block runs: the
    median and the peak of what it returned."""

    def __init__(self, fn):
        self.fn, self.vals, self._stop = fn, [], threading.Event()

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, BenchError):
                self.vals.append(self.fn())
            self._stop.wait(0.05)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def median(self):
        return int(statistics.median(self.vals)) if self.vals else None

    def peak(self):
        return max(self.vals) if self.vals else None


def _row(workload, frac, method, ops=None, p99=None, major=None, mem=None, ratio=None, **extra):
    return {"bench": "budget", "workload": workload, "budget": frac, "method": method,
            "ops_per_s": ops, "p99_us": p99, "major_faults": major, "memory_bytes": mem,
            "compression_ratio": ratio, "extra": extra}


def budget(plan, tmp: Path, step, bplan: Plan | None = None):
    bplan = bplan or Plan.make(plan.quick)
    tier_why = tier_missing()
    if tier_why:
        SKIPPED.append(f"budget: the uffdsrv-tiered rows: {tier_why}")
    for workload in WORKLOADS:
        why = redis_missing() if workload == "redis" else None
        if why:
            SKIPPED.append(f"budget: the redis rows: {why}")
            for frac in BUDGETS:
                for m in METHODS:
                    yield _row(workload, frac, m, skipped=why)
            continue
        yield from _workload(workload, bplan, tmp, step, tier_why)


def _load(workload, bplan, tmp):
    if workload == "zipf":
        return lambda cg, sock: ZipfLoad(bplan.zipf_mib, bplan.zipf_accesses,
                                         bplan.zipf_warmup, SEED, cg, sock)
    data = RedisLoad.dataset(tmp, bplan.redis_mib, SEED)
    return lambda cg, sock: RedisLoad(tmp, data, bplan.redis_requests, bplan.redis_warmup,
                                      bplan.redis_clients, cg, sock)


def _workload(workload, bplan, tmp, step, tier_why):
    make = _load(workload, bplan, tmp)
    step(f"budget: {workload}, none")
    none = _none(workload, make)
    foot = none["extra"]["footprint_bytes"]
    for frac in BUDGETS:  # one unlimited run, the reference of both budgets
        yield dict(none, budget=frac, extra=dict(none["extra"], budget_bytes=int(foot * frac)))
    swap_bytes = int(foot * 1.2) + 64 * MIB
    with kernel.KernelSwap(tmp, swap_bytes):
        for frac in BUDGETS:
            for method in ("kernel-swap", "kernel-zswap"):
                step(f"budget: {workload} at {frac:.0%}, {method}")
                t0 = time.monotonic()
                r = _kernel(workload, frac, method, make, int(foot * frac), none)
                r["extra"]["row_seconds"] = round(time.monotonic() - t0, 1)
                yield r
    for frac in BUDGETS:
        for method in ("uffdsrv-disk", "uffdsrv-tiered"):
            step(f"budget: {workload} at {frac:.0%}, {method}")
            if method == "uffdsrv-tiered" and tier_why:
                yield _row(workload, frac, method, skipped=tier_why)
                continue
            t0 = time.monotonic()
            r = _uffdsrv(workload, frac, method, make, int(foot * frac), swap_bytes, tmp, none,
                         bplan.pool_share)
            r["extra"]["row_seconds"] = round(time.monotonic() - t0, 1)
            yield r


def _measure(p, fn, server_pid=None):
    """The warm-up, then the measured run while fn() is sampled; the CPU
    time the program (and the server) spent on the measured run goes into
    its extra: in the kernel rows the program's system time is where the
    kernel reclaims and swaps in for it (a memcg limit reclaims in the
    allocating task, not in kswapd)."""
    warm = p.warm()
    c0 = cpu_seconds(p.pid), cpu_seconds(server_pid) if server_pid else 0.0
    with Sampler(fn) as s:
        done = p.run()
    done["extra"]["program_cpu_s"] = round(cpu_seconds(p.pid) - c0[0], 3)
    if server_pid:
        done["extra"]["server_cpu_s"] = round(cpu_seconds(server_pid) - c0[1], 3)
    return warm, done, s


def _rel(done, none):
    base = none.get("ops_per_s")
    return done["ops_per_s"] / base if base else None


def _none(workload, make) -> dict:
    drop_caches()
    with kernel.MemCgroup(f"{workload}-none") as cg:
        with make(cg.procs, None) as p:
            foot = cg.usage()
            m0 = kernel.major_faults(p.pid)
            warm, done, s = _measure(p, cg.usage)
            major = kernel.major_faults(p.pid) - m0
    return _row(workload, None, "none", done["ops_per_s"], done["p99_us"], major, s.median(),
                footprint_bytes=foot, memory_peak_bytes=s.peak(), relative=1.0,
                memory="the memory cgroup's usage", **done["extra"])


def _kernel(workload, frac, method, make, budget_bytes, none) -> dict:
    drop_caches()
    zs = kernel.Zswap(ZSWAP_COMPRESSOR) if method == "kernel-zswap" else None
    swap_used0 = _swap_used()
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(kernel.MemCgroup(f"{workload}-{method}-{frac}"))
        if zs:
            stack.enter_context(zs)
        p = stack.enter_context(make(cg.procs, None))
        t0 = time.perf_counter()
        try:
            cg.limit(budget_bytes)
        except BenchError as e:  # the kernel could not reclaim the group to it
            return _row(workload, frac, method, failed=str(e)[:300], budget_bytes=budget_bytes)
        limit_s = time.perf_counter() - t0

        def mem():
            z = zs.stats().get("pool_total_size", 0) if zs else 0
            return cg.usage() + z
        m0 = kernel.major_faults(p.pid)
        st0 = cg.stat()
        try:
            warm, done, s = _measure(p, mem)
        except BenchError as e:
            if not p.oom_killed():
                raise
            return _row(workload, frac, method, failed=f"killed by the memory cgroup's OOM "
                        f"killer at a limit of {budget_bytes >> 20} MiB: {e}"[:300],
                        budget_bytes=budget_bytes)
        major = kernel.major_faults(p.pid) - m0
        st1 = cg.stat()
        zst = zs.stats() if zs else {}
        zparams = zs.params() if zs else None
        ratio = (zst["stored_pages"] * PAGE / zst["pool_total_size"]
                 if zst.get("pool_total_size") else None)
    return _row(workload, frac, method, done["ops_per_s"], done["p99_us"], major, s.median(),
                ratio, budget_bytes=budget_bytes, relative=_rel(done, none),
                memory="the memory cgroup's usage + zswap's pool_total_size (v1 does not "
                       "charge the pool to the group)" if zs else "the memory cgroup's usage",
                memory_peak_bytes=s.peak(), limit_s=limit_s,
                memcg_pgmajfault=st1.get("pgmajfault", 0) - st0.get("pgmajfault", 0),
                swap_used_before_bytes=swap_used0,
                zswap={k: v for k, v in zst.items() if v} if zs else None,
                zswap_compressor=ZSWAP_COMPRESSOR if zs else None, zswap_params=zparams,
                **done["extra"])


def _swap_used() -> int:
    with open("/proc/swaps") as f:
        return sum(int(line.split()[3]) * 1024 for line in f.read().splitlines()[1:]
                   if line.strip())


def _uffdsrv(workload, frac, method, make, budget_bytes, swap_bytes, tmp, none,
             share) -> dict:
    drop_caches()
    pool = int(budget_bytes * share) // PAGE * PAGE if method == "uffdsrv-tiered" else 0
    srv = Server(tmp, swap_bytes)
    if pool:
        srv.harness.extra_args += ["--ram-tier", str(pool)]
    with srv, kernel.MemCgroup(f"{workload}-{method}-{frac}") as cg:
        idle = rss(srv.pid)
        with make(cg.procs, srv.socket) as p:
            srv.wait_client(p.pid)
            c = _managed(srv, p, cg)
            outside = max(0, cg.usage() - c["resident_bytes"])
            prog = budget_bytes - outside - pool
            if prog <= 0:
                raise BenchError(f"{workload}: {outside >> 20} MiB outside managed memory "
                                 f"leave nothing of a {budget_bytes >> 20} MiB budget")
            t0 = time.perf_counter()
            srv.limit(p.pid, prog)
            srv.wait_for(p.pid, "resident <= budget", lambda c: c["resident_bytes"] <= prog,
                         timeout=120)
            limit_s = time.perf_counter() - t0
            parts = []

            def mem():
                a, b = rss(p.pid), rss(srv.pid)
                parts.append((a, b, cg.usage()))
                return a + b
            st0 = srv.status()
            c0 = _client(st0, p.pid)
            m0 = kernel.major_faults(p.pid)
            warm, done, s = _measure(p, mem, srv.pid)
            m1 = kernel.major_faults(p.pid)
            st1 = srv.status()
            c1 = _client(st1, p.pid)
        tier = st1.get("tier") or None
    med = (lambda i: int(statistics.median(x[i] for x in parts))) if parts else (lambda i: None)
    ratio = tier.get("compression_ratio") if tier else None
    return _row(workload, frac, method, done["ops_per_s"], done["p99_us"],
                c1["refaults_total"] - c0["refaults_total"], s.median(), ratio,
                budget_bytes=budget_bytes, program_budget_bytes=prog, pool_cap_bytes=pool,
                outside_managed_bytes=outside, relative=_rel(done, none),
                memory="program RSS + server RSS (the server's includes its pool)",
                memory_peak_bytes=s.peak(), program_rss_bytes=med(0), server_rss_bytes=med(1),
                program_cgroup_usage_bytes=med(2), server_rss_idle_bytes=idle,
                limit_s=limit_s, program_majflt=m1 - m0,
                faults=c1["faults_total"] - c0["faults_total"],
                readahead_pages=c1["readahead_pages_total"] - c0["readahead_pages_total"],
                tier=_tier_delta(st0.get("tier"), tier), **done["extra"])


def _client(st, pid):
    for c in st["clients"]:
        if c["pid"] == pid:
            return c
    raise BenchError(f"pid {pid} is not a client of the server")


def _tier_delta(t0, t1):
    """The pool's state at the end, its hits and misses over the run."""
    if not t1:
        return None
    out = dict(t1)
    for k in ("hits", "misses", "hit_ns", "evicted_pages", "rejected_pages"):
        if t0 and k in t0 and k in t1:
            out[k] = t1[k] - t0[k]
    if t1.get("pool_bytes"):
        out["pool_ratio"] = t1["stored_pages"] * PAGE / t1["pool_bytes"]
    return out


def _managed(srv, p, cg) -> dict:
    """Waits until the server manages the program's memory (it picks new
    mappings up on its rescan of /proc/PID/maps, once a second): managed
    bytes at least p.data_bytes, and where p.settles, the same over two
    rescans."""
    deadline = time.monotonic() + 30
    last = None
    while True:
        c = srv.client(p.pid)
        if c["managed_bytes"] >= p.data_bytes and (last == c["managed_bytes"]
                                                   or not p.settles):
            return c
        if time.monotonic() > deadline:
            raise BenchError(f"pid {p.pid}: its memory was not managed in 30 s: {c} "
                             f"(wanted {p.data_bytes >> 20} MiB)")
        last = c["managed_bytes"] if c["managed_bytes"] >= p.data_bytes else None
        time.sleep(1.1 if last is not None else 0.1)


# ---- the workloads --------------------------------------------------------------------

def _wrap(cmd, cgroup, socket):
    """cmd under the agent if socket, in the memory cgroup from its first
    page on; both wrappers exec, so the pid is the program's own."""
    if socket:
        cmd = [PY, "-m", "uffdsrv", "run", "--socket", socket, "--", *cmd]
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup, *cmd]


class _Program:
    proc: subprocess.Popen

    @contextlib.contextmanager
    def _closed_on_error(self):
        """For the start-up: a `with` that never got the object cannot stop
        it, and its memory cgroup cannot be removed while it runs."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def oom_killed(self) -> bool:
        return self.proc.poll() == -signal.SIGKILL

    def close(self) -> None:
        stop(self.proc)
        if self.proc in STARTED:
            STARTED.remove(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ZipfLoad(_Program):
    """policyload's Zipf accesses (s = 0.99, hot pages scattered) over
    heap-like pages (--fill mixed), 10% of them writes, each access timed."""

    def __init__(self, mib, accesses, warmup, seed, cgroup, socket):
        cmd = [str(BIN / "policyload"), "--mib", str(mib), "--pattern", "zipf",
               "--accesses", str(accesses), "--warmup", str(warmup), "--seed", str(seed),
               "--fill", "mixed", "--latency"]
        self.proc = popen(_wrap(cmd, cgroup, socket), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.data_bytes = mib * MIB
        self.settles = False  # one mapping, there from the start
        with self._closed_on_error():
            self._line("ready", None, 120)

    def _line(self, want, send, timeout=300):
        if send:
            self.proc.stdin.write(send + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        out = self.proc.stdout.readline().split() if ready else []
        if not out or out[0] != want:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise BenchError(f"policyload: wanted {want!r}, got {' '.join(out)!r} "
                             f"(exit {self.proc.poll()}) {err}")
        return out[1:]

    def warm(self):
        return {"seconds": float(self._line("warm", "go")[0])}

    def run(self):
        o = self._line("done", "go")
        secs, n, mism = float(o[0]), int(o[1]), int(o[3])
        if mism:
            raise BenchError(f"policyload: {mism} pages read back wrong")
        return {"ops_per_s": n / secs, "p99_us": int(o[5]) / 1e3,
                "extra": {"accesses": n, "seconds": secs, "checksum": int(o[2]),
                          "p50_us": int(o[4]) / 1e3}}


def redis_missing() -> str | None:
    gone = [b for b in ("redis-server", "redis-cli", "redis-benchmark") if not shutil.which(b)]
    return f"not installed: {', '.join(gone)} (Debian package redis-server)" if gone else None


def _value(rng: random.Random, n: int) -> bytes:
    """A value that compresses like what caches hold: JSON text (half of
    them), packed records, half zeros, or random bytes."""
    c = rng.random()
    if c < 0.5:
        out, i = [], 0
        while sum(map(len, out)) < n:
            out.append(f'{{"id":{i},"user":"{rng.choice(_WORDS)}","status":"'
                       f'{rng.choice(_WORDS[:8])}","count":{rng.randrange(100)},"tags":["'
                       f'{rng.choice(_WORDS)}","{rng.choice(_WORDS)}"]}}\n'.encode())
            i += 1
        return b"".join(out)[:n]
    if c < 0.75:
        recs = [(k.to_bytes(8, "little") + rng.randrange(1000).to_bytes(8, "little")
                 + (0x7f0000000000 + rng.randrange(4096) * 16).to_bytes(8, "little")
                 + rng.randbytes(4) + bytes(36)) for k in range(n // 64 + 1)]
        return b"".join(recs)[:n]
    if c < 0.9:
        return rng.randbytes(n // 2) + bytes(n - n // 2)
    return rng.randbytes(n)


_WORDS = ("ok", "error", "pending", "done", "open", "closed", "new", "old", "user", "session",
          "cache", "value", "server", "client", "order", "price", "amount", "token")


class RedisLoad(_Program):
    """redis-server (Debian's, unmodified) holding `dataset()`'s keys,
    driven by redis-benchmark: GETs of key:%012d drawn uniformly from the
    keyspace (-r), on a unix socket. redis-benchmark seeds its generator
    from the clock: the sequences differ between rows, their distribution
    does not."""

    @staticmethod
    def dataset(tmp: Path, mib: int, seed: int) -> tuple[Path, int]:
        """SET commands (RESP, for redis-cli --pipe) for values of 1-4 KiB
        totalling mib MiB; the same bytes in every row."""
        rng = random.Random(seed)
        path = tmp / "redis-dataset.resp"
        total = n = 0
        with open(path, "wb") as f:
            while total < mib * MIB:
                v = _value(rng, rng.randrange(1024, 4097))
                k = b"key:%012d" % n
                f.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                        % (len(k), k, len(v), v))
                total += len(v)
                n += 1
        return path, n

    def __init__(self, tmp, data, requests, warmup, clients, cgroup, socket):
        self.data, self.keys = data
        self.requests, self.warmup, self.clients = requests, warmup, clients
        self.sock = str(tmp / f"redis-{time.monotonic_ns()}.sock")
        cmd = [shutil.which("redis-server"), "--port", "0", "--unixsocket", self.sock,
               "--save", "", "--appendonly", "no", "--dir", str(tmp)]
        self.proc = popen(_wrap(cmd, cgroup, socket), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        with self._closed_on_error():
            self._start()

    def _start(self) -> None:
        deadline = time.monotonic() + 30
        while self._cli("ping") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.05)
        with open(self.data, "rb") as f:
            r = subprocess.run(["redis-cli", "-s", self.sock, "--pipe"], stdin=f,
                               capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or "errors: 0," not in r.stdout:
            raise BenchError(f"redis-cli --pipe: {r.stdout[-300:]} {r.stderr[-300:]}")
        self.data_bytes = int(self.info()["used_memory"]) // 2
        self.settles = True  # jemalloc's extents: wait until no new one is picked up

    def _cli(self, *args) -> str:
        r = subprocess.run(["redis-cli", "-s", self.sock, *args], capture_output=True,
                           text=True, timeout=60)
        return r.stdout.strip()

    def info(self) -> dict:
        return dict(line.split(":", 1) for line in self._cli("info").splitlines()
                    if ":" in line)

    def _bench(self, n) -> dict:
        r = subprocess.run(["redis-benchmark", "-s", self.sock, "-t", "get", "-r",
                            str(self.keys), "-n", str(n), "-c", str(self.clients), "--csv",
                            "--precision", "3"], capture_output=True, text=True, timeout=600)
        rows = [line.replace('"', "").split(",") for line in r.stdout.splitlines()]
        head = next((x for x in rows if x and x[0] == "test"), None)
        got = next((x for x in rows if x and x[0] == "GET"), None)
        if r.returncode != 0 or not head or not got:
            raise BenchError(f"redis-benchmark (exit {r.returncode}, redis exit "
                             f"{self.proc.poll()}): {r.stdout[-300:]} {r.stderr[-300:]}")
        return dict(zip(head, got))

    def warm(self):
        return self._bench(self.warmup)

    def run(self):
        i0 = self.info()
        b = self._bench(self.requests)
        i1 = self.info()
        hits = int(i1["keyspace_hits"]) - int(i0["keyspace_hits"])
        misses = int(i1["keyspace_misses"]) - int(i0["keyspace_misses"])
        return {"ops_per_s": float(b["rps"]), "p99_us": float(b["p99_latency_ms"]) * 1e3,
                "extra": {"requests": self.requests, "keys": self.keys, "hits": hits,
                          "misses": misses, "p50_us": float(b["p50_latency_ms"]) * 1e3,
                          "clients": self.clients, "used_memory": int(i1["used_memory"])}}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._cli("shutdown", "nosave")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        super().close()
