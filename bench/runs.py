"""The benchmarks. Each yields rows, one measurement each:

    {"bench": "zap"|"reclaim"|"fault"|"policy"|"manage"|"busy-reclaim",
     "method": str, "threads": int, ...}

and calls `step(description)` as it goes, for the progress display. The
fault benchmark lives in bench/fault.py, the cost of being managed and the
reclaim of a busy program in bench/manage.py.
"""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from uffdsrv.core.pages import PAGE
from uffdsrv.system.proc import tlb_shootdowns
from uffdsrv.system.procfs import meminfo

from . import fault as _fault
from . import manage as _manage
from .kernel import KernelSwap, cached_bytes, pcp_free_bytes
from .procs import (
    GIB,
    MIB,
    BenchError,
    Faulter,
    PolicyLoad,
    Server,
    cpu_seconds,
    zapbench,
)

fault = _fault.fault
manage = _manage.manage

VLENS = (1, 8, 64, 256, 1024)
MEMORIES = ("anon", "uffd", "uffd+remove")
POLICIES = ("coldest", "fifo", "random")
POLICY_PATTERNS = ("zipf", "seq")
BUDGET_FRACTION = 0.25
POLICY_SEED = 42
BUSY = 1  # busy threads in the reclaimed workload


@dataclass
class Plan:
    quick: bool
    zap_ranges: int = 1024
    zap_rounds: int = 40
    reclaim_mib: int = 256   # the workload; every other page filled
    fault_mib: int = 128     # dense
    fault_reps: int = 3
    policy_mib: int = 128
    # accesses per pattern: a warm-up (not counted), then the measured run
    policy_accesses: dict = field(default_factory=lambda: {"zipf": 200_000, "seq": 2 * 32768})
    policy_warmup: dict = field(default_factory=lambda: {"zipf": 50_000, "seq": 8192})
    memfree_window_s: float = 5.0  # how long MemFree is watched after a reclaim returns
    stress_s: float = 5.0          # stress-ng --timeout, plain and managed
    busy_settle_s: float = 2.0     # the busy program runs managed this long before reclaim

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(quick=True, zap_rounds=6, reclaim_mib=32, fault_mib=16, fault_reps=1,
                       policy_mib=32, policy_accesses={"zipf": 25_000, "seq": 8192},
                       policy_warmup={"zipf": 5_000, "seq": 2048}, memfree_window_s=0.5,
                       stress_s=2.0, busy_settle_s=0.5)
        return cls(quick=False)

    def busy_counts(self) -> list[int]:
        n = os.cpu_count() or 1
        counts = [0, 1] if n > 1 else [0]
        if n > 2:
            counts.append(n - 1)  # every other CPU busy
        return counts

    def steps(self, which: set[str]) -> int:
        n = 0
        if "zap" in which:
            n += len(MEMORIES) * len(self.busy_counts())
        if "reclaim" in which:
            n += 3 * 2
        if "fault" in which:
            n += _fault.steps(self)
        if "policy" in which:
            n += len(POLICIES) * len(POLICY_PATTERNS)
        if "manage" in which:
            n += _manage.steps()
        return n


def _tlb() -> int:
    n = tlb_shootdowns()
    return 0 if n is None else n


# ---- zap ------------------------------------------------------------------------------

SKIPPED: list[str] = []  # rows this kernel cannot measure, and why


def zap(plan: Plan, tmp: Path, step):
    from uffdsrv.system import kernel
    vlens = VLENS
    if not kernel.current().features.get("process_madvise_self"):
        # zapbench skips vlen 0: the madvise rows only, no timing of a call
        # that fails (EBADF before 6.13)
        vlens = (0,)
        SKIPPED.append("zap: the process_madvise rows: this kernel lacks "
                       "process_madvise(PIDFD_SELF, MADV_DONTNEED) (6.13+)")
    for memory in MEMORIES:
        for busy in plan.busy_counts():
            step(f"zap: {memory}, {busy} busy thread(s)")
            for r in zapbench(memory, busy, plan.zap_ranges, plan.zap_rounds, vlens):
                per_round = r["ranges_per_round"]
                yield {"bench": "zap", "method": r["method"], "threads": busy,
                       "vlen": r["vlen"], "memory": memory,
                       "us_per_range": r["seconds"] / r["ranges"] * 1e6,
                       "median_us_per_range": r["median_round_seconds"] / per_round * 1e6,
                       "tlb_per_range": r["tlb"] / r["ranges"],
                       "tlb_per_call": r["tlb"] / r["calls"],
                       "ranges": r["ranges"], "calls": r["calls"], "tlb": r["tlb"]}


# ---- reclaim --------------------------------------------------------------------------

def _reclaim_row(method, pages, secs, tlb, cpu, extra):
    gib = pages * PAGE / GIB
    return {"bench": "reclaim", "method": method, "threads": 1,
            "pages": pages, "seconds": secs,
            "pages_per_s": pages / secs if secs > 0 else float("nan"),
            "tlb_per_page": tlb / pages if pages else float("nan"),
            "cpu_s_per_gib": cpu / gib if gib else float("nan"), "tlb": tlb,
            "cpu_s": cpu, **extra}


def memory_now() -> dict:
    """/proc/meminfo, plus "Free": MemFree and the per-CPU free lists."""
    m = meminfo()
    m["Free"] = m["MemFree"] + pcp_free_bytes()
    return m


def before(window: float) -> dict:
    """memory_now() at the end of `window` seconds of watching it with
    nothing of ours running: "_range" holds how far MemFree and Free moved
    meanwhile (max - min), the machine's own noise, against which a gain
    measured over the same window after a reclaim can be read."""
    deadline = time.monotonic() + window
    lo = hi = None
    while True:
        m = memory_now()
        pair = (m["MemFree"], m["Free"])
        lo = pair if lo is None else tuple(map(min, lo, pair))
        hi = pair if hi is None else tuple(map(max, hi, pair))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    m["_range"] = (hi[0] - lo[0], hi[1] - lo[1])
    return m


def given_back(m0: dict, nbytes: int, window: float) -> dict:
    """What the machine got back from a reclaim of nbytes that just
    returned, m0 being memory_now() just before it: the most MemFree gained
    within `window` seconds (sampled every 50 ms), the same for MemFree
    plus the per-CPU free lists (where freed pages wait, free, before
    MemFree counts them), and how much the page cache (Cached) and the
    swap cache (SwapCached) grew by the end of it, each over nbytes.
    Machine-wide figures: whatever else runs moves them too."""
    deadline = time.monotonic() + window
    best = best_free = None
    while True:
        m = memory_now()
        gain, free = m["MemFree"] - m0["MemFree"], m["Free"] - m0["Free"]
        best = gain if best is None else max(best, gain)
        best_free = free if best_free is None else max(best_free, free)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    cache = m["Cached"] - m0["Cached"]
    swc = m.get("SwapCached", 0) - m0.get("SwapCached", 0)
    ratio = (lambda v: v / nbytes) if nbytes else (lambda v: float("nan"))
    return {"memfree_gain_bytes": best, "memfree_gain_ratio": ratio(best),
            "free_gain_ratio": ratio(best_free),
            "page_cache_growth_bytes": cache, "page_cache_growth_ratio": ratio(cache),
            "swap_cache_growth_ratio": ratio(swc), "memfree_window_s": window,
            "memfree_noise_ratio": ratio(m0["_range"][0]) if "_range" in m0 else float("nan"),
            "free_noise_ratio": ratio(m0["_range"][1]) if "_range" in m0 else float("nan")}


def reclaim(plan: Plan, tmp: Path, step):
    """Every other page of the workload is filled, so that each reclaimed
    page is a range of its own: the server cannot merge neighbours, and
    `--zap-mode madvise` really is one madvise per page. Two passes per
    method: onto a fresh swap file, then, after the pages were faulted back
    and rewritten, onto the reused one. The workload keeps one thread busy
    meanwhile, as a running program would: that thread is what turns a zap
    into a cross-CPU TLB shootdown. After each reclaim returns, MemFree is
    watched for `memfree_window_s`: memory given back is the machine's,
    not the program's RSS (a swap file written through the page cache, or
    MADV_PAGEOUT's swap cache, keeps the pages in RAM)."""
    mib = plan.reclaim_mib
    window = plan.memfree_window_s
    for zap_mode in ("process_madvise", "madvise"):
        with Server(tmp, mib * MIB + 64 * MIB, zap_mode) as srv, \
                Faulter(mib, stride=2, socket=srv.socket, busy=BUSY) as f:
            srv.wait_client(f.pid)
            for swap_file in ("fresh", "reused"):
                step(f"reclaim: uffdsrv --zap-mode {zap_mode}, {swap_file} swap file")
                if swap_file == "reused":
                    f.refill()  # faults every page back in, and dirties it
                m0 = before(window)
                t0 = _tlb()
                c0 = cpu_seconds(srv.pid) + cpu_seconds(f.pid)
                s0 = time.perf_counter()
                got = srv.reclaim(f.pid)
                secs = time.perf_counter() - s0
                cpu = cpu_seconds(srv.pid) + cpu_seconds(f.pid) - c0
                tlb = _tlb() - t0
                back = given_back(m0, got, window)
                swap = srv.status()["swap"]
                io_mode = swap.get("io_mode")
                # the swap file's own pages in the page cache, after the window
                cached = cached_bytes(swap.get("path") or srv.dir / "swap")
                back["swap_file_cached_ratio"] = (cached / got if cached is not None and got
                                                  else float("nan"))
                yield _reclaim_row(zap_mode, got // PAGE, secs, tlb, cpu,
                                   {"swap_file": swap_file, "mib": mib, "layout": "every 2nd page",
                                    "filled_pages": f.nfilled,
                                    "busy_threads": BUSY, "zap_mode": zap_mode,
                                    "io_mode": io_mode, **back})
    with KernelSwap(tmp, mib * MIB // 2 + 16 * MIB), Faulter(mib, stride=2, busy=BUSY) as f:
        for swap_file in ("fresh", "reused"):
            step(f"reclaim: kernel MADV_PAGEOUT, {swap_file} swap file")
            if swap_file == "reused":
                f.refill()
            m0 = before(window)
            c0 = cpu_seconds(f.pid)
            o = f.cmd("pageout")
            cpu = cpu_seconds(f.pid) - c0
            secs, tlb, swapped = float(o[0]), int(o[1]), int(o[3])
            back = given_back(m0, swapped * PAGE, window)
            yield _reclaim_row("pageout", swapped, secs, tlb, cpu,
                               {"swap_file": swap_file, "mib": mib, "layout": "every 2nd page",
                                    "filled_pages": f.nfilled,
                                "busy_threads": BUSY, "still_in_swap_cache": int(o[4]), **back})


# ---- policy ---------------------------------------------------------------------------

def policy(plan: Plan, tmp: Path, step):
    """Which pages a policy keeps: a program held by the server at a budget
    of a quarter of its memory (`uffdsrv limit`), accessing its pages
    Zipf-distributed (s = 0.99, hot pages scattered over the mapping) or in
    a sequential loop. One server per policy, the two programs one after
    the other; the same seed, hence the same access sequence, under every
    policy. Each program first runs a warm-up (the policy learns what it
    can), then the measured accesses; the refaults and readahead pages of
    the measured part come from the server's counters."""
    mib = plan.policy_mib
    size = mib * MIB
    budget = int(size * BUDGET_FRACTION)
    for name in POLICIES:
        with Server(tmp, size + 64 * MIB, policy=name) as srv:
            for pattern in POLICY_PATTERNS:
                step(f"policy: {name}, {pattern}, {mib} MiB at {BUDGET_FRACTION:.0%}")
                with PolicyLoad(srv.socket, mib, pattern, plan.policy_accesses[pattern],
                                plan.policy_warmup[pattern], POLICY_SEED) as p:
                    # the server picks the mapping up on its next rescan of
                    # /proc/PID/maps (once a second); only then can it be held
                    srv.wait_client(p.pid)
                    srv.wait_for(p.pid, "the mapping managed",
                                 lambda c: c["managed_bytes"] >= size)
                    srv.limit(p.pid, budget)
                    srv.wait_for(p.pid, "resident <= budget",
                                 lambda c: c["resident_bytes"] <= budget, timeout=120)
                    w0 = srv.client(p.pid)
                    warm = p.warm()
                    c0 = srv.client(p.pid)
                    done = p.run()
                    c1 = srv.client(p.pid)
                    srv.limit(p.pid, None)
                mism = warm["mismatches"] + done["mismatches"]
                if mism:
                    raise BenchError(f"policy {name}, {pattern}: {mism} pages read back wrong")
                refaults = c1["refaults_total"] - c0["refaults_total"]
                ra = c1["readahead_pages_total"] - c0["readahead_pages_total"]
                n = done["accesses"]
                wn = warm["accesses"]
                w_ref = c0["refaults_total"] - w0["refaults_total"]
                yield {"bench": "policy", "method": name, "threads": 1, "pattern": pattern,
                       "mib": mib, "budget_fraction": BUDGET_FRACTION,
                       "budget_bytes": budget, "accesses": n, "seconds": done["seconds"],
                       "refaults": refaults, "readahead_pages": ra,
                       "refaults_per_1000": refaults / n * 1000,
                       "accesses_per_s": (n / done["seconds"] if done["seconds"] > 0
                                          else float("nan")),
                       "pages_per_swap_fault": ((refaults + ra) / refaults if refaults
                                                else float("nan")),
                       "faults": c1["faults_total"] - c0["faults_total"],
                       "warmup_accesses": wn,
                       "warmup_refaults_per_1000": w_ref / wn * 1000 if wn else float("nan"),
                       "resident_bytes_end": c1["resident_bytes"],
                       "mismatches": mism, "checksum": done["checksum"]}
