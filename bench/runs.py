"""The three benchmarks. Each yields rows, one measurement each:

    {"bench": "zap"|"reclaim"|"fault", "method": str, "threads": int, ...}

and calls `step(description)` as it goes, for the progress display.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from uffdsrv.system.proc import tlb_shootdowns

from .procs import GIB, MIB, PAGE, Faulter, KernelSwap, Server, cpu_seconds, zapbench

VLENS = (1, 8, 64, 256, 1024)
MEMORIES = ("anon", "uffd", "uffd+remove")
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

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(quick=True, zap_rounds=6, reclaim_mib=32, fault_mib=16, fault_reps=1)
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
