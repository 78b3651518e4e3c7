"""The fault benchmark: reclaimed memory faulted back in, by four
contenders on the same device, side by side in one run.

* `uffdsrv`: the server, its own swap file; the faulter under the agent.
* `c-reference`: native/bench/refhandler.c, the smallest out-of-process
  handler (poll, read, pread, UFFDIO_COPY, one page per fault), reading
  the same kind of swap file with O_DIRECT, so that both pay the device.
* `kernel-swap`: the kernel's swap-in with the pages really on the device:
  the faulter runs in a memory cgroup of its own, whose limit is lowered
  until its pages are written to a swap file and gone from the swap cache,
  then raised again before the timed walk (bench/kernel.py). Real when
  the walk takes major faults and SwapCached was near 0 before it: both
  are in the row.
* `kernel-swap-cached`: MADV_PAGEOUT with no memory pressure; the pages
  stay in the swap cache and every fault is a minor one. The kernel's
  best case, not a device read.

Every walk touches every page once (in order, or shuffled; 1 or 4 threads)
after a full reclaim of freshly rewritten pages. Sequential walks run as
three rounds, each after a full reclaim of the pages the previous round
brought back, so that a readahead that decays once pages have been
reclaimed again shows up as falling pages/s across `round` 1..3.

`cpu_s_per_gib` is the CPU time of the serving side per GiB faulted in:
the server process (all its threads), the C handler process, or, for the
kernel, the faulter's own system time (where the kernel accounts a
swap-in) minus that of the same walk with every page resident (the
pagemap read each access costs, which the other contenders' rows do not
carry).
"""
import time
from pathlib import Path

from uffdsrv.core.pages import PAGE
from uffdsrv.system.procfs import meminfo

from .kernel import KernelSwap, MemCgroup, cached_bytes, major_faults
from .procs import GIB, MIB, Faulter, Server, cpu_seconds

ROUNDS = 3


def walks(plan) -> list[tuple[str, int, int | None, int]]:
    """(pattern, threads, round, rep) in the order they run: the sequential
    1-thread rounds first, on memory reclaimed for the first time."""
    out = [("seq", 1, r, r - 1) for r in range(1, ROUNDS + 1)]
    for threads in (1, 4):
        out += [("random", threads, None, rep) for rep in range(plan.fault_reps)]
    out += [("seq", 4, r, r - 1) for r in range(1, ROUNDS + 1)]
    return out


def steps(plan) -> int:
    return 4 * len(walks(plan))


def _rows(plan, method: str, f: Faulter, step, prepare, serving_cpu, cpu_source: str):
    """prepare() reclaims and returns facts for the row; serving_cpu(walk)
    -> (CPU seconds of the serving side, from a before() callable) is
    given the walk's result."""
    for pattern, threads, rnd, rep in walks(plan):
        step(f"fault: {method}, {pattern}, {threads} thread(s)"
             + (f", round {rnd}" if rnd else ""))
        f.refill()
        info = prepare() or {}
        swapcached = meminfo().get("SwapCached", 0)
        before = serving_cpu(None, None)
        m0 = major_faults(f.pid)
        r = f.fault(pattern, threads)
        majors = major_faults(f.pid) - m0
        cpu = serving_cpu(before, (f, pattern, threads, r))
        gib = r["pages"] * PAGE / GIB
        row = {"bench": "fault", "method": method, "threads": threads, "pattern": pattern,
               "rep": rep, "mib": plan.fault_mib, **r, **info,
               "major_faults": majors, "swapcached_before_bytes": swapcached,
               "cpu_s": cpu, "cpu_s_per_gib": cpu / gib if gib else float("nan"),
               "cpu_source": cpu_source}
        if rnd is not None:
            row["round"] = rnd
        yield row


def _kernel_cpu(before, walk):
    """The faulter's system time in the walk, minus a second, resident walk."""
    if walk is None:
        return None
    f, pattern, threads, r = walk
    again = f.fault(pattern, threads)  # every page is present now: no faults
    return max(0.0, r["faulter_sys_s"] - again["faulter_sys_s"])


def fault(plan, tmp: Path, step):
    mib = plan.fault_mib

    with Server(tmp, mib * MIB + 64 * MIB) as srv, Faulter(mib, socket=srv.socket) as f:
        srv.wait_client(f.pid)

        def srv_reclaim():
            got = srv.reclaim(f.pid)
            swap = srv.status()["swap"]
            # Pages of the swap file in the page cache would be served from
            # memory, not the device: say how many there are.
            cached = cached_bytes(swap.get("path") or srv.dir / "swap")
            return {"reclaimed_pages": got // PAGE, "io_mode": swap.get("io_mode"),
                    "swap_file_cached_pages": None if cached is None else cached // PAGE}

        def srv_cpu(before, walk):
            now = cpu_seconds(srv.pid)
            return now if walk is None else now - before
        yield from _rows(plan, "uffdsrv", f, step, srv_reclaim, srv_cpu,
                         "the server process, all threads")

    refdir = Path(tmp) / "c-reference"
    refdir.mkdir(exist_ok=True)
    with Faulter(mib) as f:
        def ref_reclaim():
            o = f.refreclaim(refdir / "swap")
            cached = cached_bytes(refdir / "swap")
            return {"reclaimed_pages": f.nfilled, "io_mode": o["io_mode"],
                    "swap_file_cached_pages": None if cached is None else cached // PAGE}

        def ref_cpu(before, walk):
            # the handler starts at refreclaim and serves only this walk
            return None if walk is None else walk[3]["handler_cpu_s"]
        yield from _rows(plan, "c-reference", f, step, ref_reclaim, ref_cpu,
                         "the C handler process")

    with KernelSwap(tmp, 2 * mib * MIB):
        with MemCgroup("fault") as cg, Faulter(mib, cgroup=cg.procs) as f:
            def push_out():
                t0 = time.perf_counter()
                info = cg.push_out(f.swapstat)
                info["reclaim_s"] = time.perf_counter() - t0
                info["reclaimed_pages"] = info["swapped_pages"]
                return info
            yield from _rows(plan, "kernel-swap", f, step, push_out, _kernel_cpu,
                             "the faulter's system time, minus a resident walk's")

        with Faulter(mib) as f:
            def pageout():
                o = f.cmd("pageout")
                # Without memory pressure a page MADV_PAGEOUT wrote stays in
                # the swap cache: its fault-in is a minor fault, no read.
                return {"reclaimed_pages": int(o[3]), "still_in_swap_cache": int(o[4]),
                        "reclaim_s": float(o[0])}
            yield from _rows(plan, "kernel-swap-cached", f, step, pageout, _kernel_cpu,
                             "the faulter's system time, minus a resident walk's")
