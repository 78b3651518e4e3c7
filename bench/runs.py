"""The four benchmarks. Each yields rows, one measurement each:

    {"bench": "zap"|"reclaim"|"fault"|"policy", "method": str, "threads": int, ...}

and calls `step(description)` as it goes, for the progress display.
"""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from uffdsrv.system.proc import tlb_shootdowns

from .procs import (
    GIB,
    MIB,
    PAGE,
    BenchError,
    Faulter,
    KernelSwap,
    PolicyLoad,
    Server,
    cpu_seconds,
    zapbench,
)

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
    patterns: tuple = ("seq", "random")
    fault_threads: tuple = (1, 4)
    policy_mib: int = 128
    # accesses per pattern: a warm-up (not counted), then the measured run
    policy_accesses: dict = field(default_factory=lambda: {"zipf": 200_000, "seq": 2 * 32768})
    policy_warmup: dict = field(default_factory=lambda: {"zipf": 50_000, "seq": 8192})

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(quick=True, zap_rounds=6, reclaim_mib=32, fault_mib=16, fault_reps=1,
                       policy_mib=32, policy_accesses={"zipf": 25_000, "seq": 8192},
                       policy_warmup={"zipf": 5_000, "seq": 2048})
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
            n += 3 * len(self.patterns) * len(self.fault_threads) * self.fault_reps
        if "policy" in which:
            n += len(POLICIES) * len(POLICY_PATTERNS)
        return n


def _tlb() -> int:
    n = tlb_shootdowns()
    return 0 if n is None else n


# ---- zap ------------------------------------------------------------------------------

def zap(plan: Plan, tmp: Path, step):
    for memory in MEMORIES:
        for busy in plan.busy_counts():
            step(f"zap: {memory}, {busy} busy thread(s)")
            for r in zapbench(memory, busy, plan.zap_ranges, plan.zap_rounds, VLENS):
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


def reclaim(plan: Plan, tmp: Path, step):
    """Every other page of the workload is filled, so that each reclaimed
    page is a range of its own: the server cannot merge neighbours, and
    `--zap-mode madvise` really is one madvise per page. Two passes per
    method: onto a fresh swap file (the server's is sparse: first writes
    allocate blocks), then, after the pages were faulted back and
    rewritten, onto the reused one. The workload keeps one thread busy
    meanwhile, as a running program would: that thread is what turns a zap
    into a cross-CPU TLB shootdown."""
    mib = plan.reclaim_mib
    for zap_mode in ("process_madvise", "madvise"):
        with Server(tmp, mib * MIB + 64 * MIB, zap_mode) as srv, \
                Faulter(mib, stride=2, socket=srv.socket, busy=BUSY) as f:
            srv.wait_client(f.pid)
            for swap_file in ("fresh", "reused"):
                step(f"reclaim: uffdsrv --zap-mode {zap_mode}, {swap_file} swap file")
                if swap_file == "reused":
                    f.refill()  # faults every page back in, and dirties it
                t0 = _tlb()
                c0 = cpu_seconds(srv.pid) + cpu_seconds(f.pid)
                s0 = time.perf_counter()
                got = srv.reclaim(f.pid)
                secs = time.perf_counter() - s0
                cpu = cpu_seconds(srv.pid) + cpu_seconds(f.pid) - c0
                tlb = _tlb() - t0
                yield _reclaim_row(zap_mode, got // PAGE, secs, tlb, cpu,
                                   {"swap_file": swap_file, "mib": mib, "layout": "every 2nd page",
                                    "busy_threads": BUSY,
                                    "zap_mode": zap_mode})
    with KernelSwap(tmp, mib * MIB // 2 + 16 * MIB), Faulter(mib, stride=2, busy=BUSY) as f:
        for swap_file in ("fresh", "reused"):
            step(f"reclaim: kernel MADV_PAGEOUT, {swap_file} swap file")
            if swap_file == "reused":
                f.refill()
            c0 = cpu_seconds(f.pid)
            o = f.cmd("pageout")
            cpu = cpu_seconds(f.pid) - c0
            secs, tlb, swapped = float(o[0]), int(o[1]), int(o[3])
            yield _reclaim_row("pageout", swapped, secs, tlb, cpu,
                               {"swap_file": swap_file, "mib": mib, "layout": "every 2nd page",
                                    "busy_threads": BUSY,
                                "still_in_swap_cache": int(o[4])})


# ---- fault ----------------------------------------------------------------------------

def fault(plan: Plan, tmp: Path, step):
    """Fault-in of reclaimed memory: `fault_mib` MiB, every page filled,
    reclaimed whole, then touched once each, in order or shuffled, by 1 or
    4 threads. Each combination is reclaimed afresh (the pages are
    rewritten first, so every reclaim has something to write)."""
    mib = plan.fault_mib
    combos = [(p, t) for p in plan.patterns for t in plan.fault_threads]

    def rows(method, f, prepare, extra=None):
        for rep in range(plan.fault_reps):
            for pattern, threads in combos:
                step(f"fault: {method}, {pattern}, {threads} thread(s)")
                f.refill()
                info = prepare() or {}
                r = f.fault(pattern, threads)
                yield {"bench": "fault", "method": method, "threads": threads,
                       "pattern": pattern, "rep": rep, "mib": mib, **r, **info,
                       **(extra or {})}

    with Server(tmp, mib * MIB + 64 * MIB) as srv, Faulter(mib, socket=srv.socket) as f:
        srv.wait_client(f.pid)

        def srv_reclaim():
            got = srv.reclaim(f.pid)
            return {"reclaimed_pages": got // PAGE}
        yield from rows("uffdsrv", f, srv_reclaim)

    refdir = Path(tmp) / "c-reference"
    refdir.mkdir(exist_ok=True)
    with Faulter(mib) as f:
        def ref_reclaim():
            f.cmd(f"refreclaim {refdir / 'swap'}")
            return {"reclaimed_pages": f.nfilled}
        yield from rows("c-reference", f, ref_reclaim)

    with KernelSwap(tmp, mib * MIB), Faulter(mib) as f:
        def pageout():
            o = f.cmd("pageout")
            swapped, cached = int(o[3]), int(o[4])
            # Without memory pressure a page MADV_PAGEOUT wrote stays in the
            # swap cache: its fault-in is a minor fault, no read. Say how many.
            return {"reclaimed_pages": swapped, "still_in_swap_cache": cached}
        yield from rows("kernel-swap", f, pageout)


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
