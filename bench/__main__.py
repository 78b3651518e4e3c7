"""python -m bench {zap,reclaim,fault,policy,manage,budget,all} [--quick] [--json FILE]

What vectored process_madvise buys over madvise, how uffdsrv's reclaim and
fault path compare with a minimal C handler and with the kernel's own swap
on the same device, which pages each reclaim policy keeps under a budget,
what being managed costs a busy program, and (`budget`) how fast a program
held at the same memory budget runs under uffdsrv and under the kernel's
swap and zswap; all in one run, on this machine. Needs root (userfaultfd,
swapon, a memory cgroup, the server), stress-ng for `manage` and
redis-server for `budget`'s redis rows. `all --quick` leaves `budget` out
(its own quick run takes about as long as the rest); a full `all` runs it.

Writes bench/results/results.json, results.md and *.png; `--json FILE`
writes the JSON there too. A full `all` run also rewrites bench/RESULTS.md.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import budget, kernel, procs, report, runs, stress

BENCHES = ("zap", "reclaim", "fault", "policy", "manage")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CAVEATS = """Read with care: (1) `kernel-swap` is the kernel's swap-in from the device: the
faulter's memory cgroup limit was lowered until its pages were on the swap file and
out of the swap cache (the rows give the major faults of the walk and SwapCached
before it); `kernel-swap-cached` is MADV_PAGEOUT with no pressure, whose pages stay
in the swap cache (minor faults): the kernel's best case. (2) The C reference reads
its swap file with O_DIRECT, one page per fault, as the server's swap reads do.
(3) `cpu_s_per_gib` of a fault row is the serving side's CPU: the server process,
the C handler process, and for the kernel the faulter's system time minus that of
the same walk with every page resident (the kernel's share of the fault; device
interrupts that land on another task are not in it). (4) MemFree and Cached are
machine-wide: anything else running moves them. Since Linux 6.7 pages freed in a
burst wait on the per-CPU free lists (up to ~188 MiB per CPU here), free but not
in MemFree, and drain into it at a few MiB/s: the reclaim rows give MemFree alone
(the target) and MemFree plus those lists. (5) On a KVM guest with
paravirtual TLB flush, a flush aimed at a preempted vCPU is deferred without an
IPI, so shootdown counts vary between runs; ratios within one run count. (6) The
reclaim workload has every other page filled, so every reclaimed page is a range
of its own (the worst case for zaps), and one thread busy. (7) stress-ng
bogo-ops/s depend on what else the 2 CPUs do: plain and managed run back to back.
(8) busy-reclaim's "managed" bytes are every managed mapping of the workers,
including heap reserves never touched, so reclaimed / resident is given beside it.
(9) budget: the budget is a share of the program's footprint (its memory cgroup's
usage once loaded, unlimited). The kernel rows limit the program's v1 memory cgroup
to it; zswap (compressor lzo-rle) on cgroup v1 does not charge its pool to the group,
so kernel-zswap holds the budget plus its pool and its memory_bytes adds
pool_total_size to the group's usage. The uffdsrv rows limit the managed memory to
the budget minus what the program has outside managed mappings minus the RAM
tier's cap (a quarter of the budget in uffdsrv-tiered, `--pool-share`): program
budget + pool cap = the budget; their memory_bytes is program RSS (file pages
included) + server RSS (its pool, its Python interpreter and its 64 MiB registered
I/O arena; the idle server alone is server_rss_idle_bytes). The kernel-zswap rows
were OOM-killed at a 16 MiB limit (2 of 4 tries), so the quick run keeps 128 MiB;
such a row is reported as failed, not dropped. The
server enforces a budget after the fact (every 50 ms), the kernel at every
allocation. The page cache is dropped before each row (each program's own file
pages are charged to its group alike). redis-benchmark draws keys uniformly and
seeds from the clock; the Zipf rows replay one seeded sequence. zswap's ratio is
stored_pages x 4096 / pool_total_size; the pool's is stored bytes over compressed
bytes (pool_ratio, over the pool's whole size, beside it).

"""


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{os.cpu_count()} CPUs ({model}), {ram:.1f} GiB RAM, Linux {platform.release()} "
            f"{platform.machine()}, Python {platform.python_version()}")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[2])
    p.add_argument("which", choices=(*BENCHES, "budget", "all"))
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    p.add_argument("--json", metavar="FILE", help="also write the JSON here")
    p.add_argument("--pool-share", type=float, default=budget.POOL_SHARE, metavar="F",
                   help="budget: the share of the budget that uffdsrv-tiered gives its RAM "
                        f"tier (default {budget.POOL_SHARE})")
    a = p.parse_args(argv)
    console = Console(stderr=True)
    if os.geteuid() != 0:
        console.print("bench: needs root (userfaultfd, process_vm_readv, swapon)")
        return 2
    missing = [b for b in ("zapbench", "faulter", "refhandler", "policyload",
                           "libuffdsrv_agent.so")
               if not (procs.BIN / b).exists()]
    if missing:
        console.print(f"bench: not built: {', '.join(missing)} (run make setup)")
        return 2
    which = set(BENCHES) if a.which == "all" else {a.which}
    if a.which == "all" and not a.quick:
        which.add("budget")
    if "manage" in which and not stress.available():
        console.print("bench: manage needs stress-ng (apt-get install stress-ng, or make setup)")
        return 2
    plan = runs.Plan.make(a.quick)
    bplan = budget.Plan.make(a.quick)
    if not 0 < a.pool_share < 1:
        console.print("bench: --pool-share is a fraction of the budget, between 0 and 1")
        return 2
    bplan.pool_share = a.pool_share
    procs.install_signal_handlers()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    rows = []
    took = {}
    cmd = "python -m bench " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    try:
        with tempfile.TemporaryDirectory(prefix="uffdsrv-bench-") as tmp, Progress(
                TextColumn("{task.description:<58}"), BarColumn(),
                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                console=console) as progress:
            total = plan.steps(which) + (budget.steps(bplan) if "budget" in which else 0)
            task = progress.add_task("starting", total=total)
            first = [True]

            def step(desc):
                if not first[0]:
                    progress.advance(task)
                first[0] = False
                progress.update(task, description=desc)
            for name in (*BENCHES, "budget"):
                if name in which:
                    b0 = time.monotonic()
                    run = (budget.budget(plan, Path(tmp), step, bplan) if name == "budget"
                           else getattr(runs, name)(plan, Path(tmp), step))
                    # closing(): an interrupt that lands between two rows
                    # still runs the benchmark's own exits (servers stopped,
                    # swapoff, cgroup removed) before tmp is deleted
                    with contextlib.closing(run) as gen:
                        for row in gen:
                            rows.append(row)
                    took[name] = round(time.monotonic() - b0, 1)
            progress.advance(task)
            progress.update(task, description="done")
    except procs.BenchError as e:
        console.print(f"bench: {e}")
        return 1
    except KeyboardInterrupt:
        console.print("bench: interrupted; cleaned up")
        return 130
    finally:
        procs.cleanup()
    meta = {"machine": machine(), "command": cmd, "quick": a.quick,
            "started": started.isoformat(timespec="seconds"),
            "seconds": time.monotonic() - t0, "kernel": platform.release(),
            "kernel_features": kernel.features(), "cpus": os.cpu_count(),
            "skipped": runs.SKIPPED + budget.SKIPPED,
            "bench_seconds": took}
    rats = report.ratios(rows)
    doc = {"meta": meta, "rows": [{k: _clean(v) for k, v in r.items()} for r in rows],
           "ratios": [{k: _clean(v) for k, v in r.items()} for r in rats]}
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(doc, indent=1)
    (RESULTS / "results.json").write_text(text)
    if a.json:
        Path(a.json).write_text(text)
    md = report.markdown(rows, rats, meta)
    (RESULTS / "results.md").write_text(md)
    pngs = report.plots(rows, RESULTS)
    if a.which == "all" and not a.quick:
        (HERE / "RESULTS.md").write_text(
            "# Benchmark results: latest full run\n\n"
            "Written by `python -m bench all` (see README, Benchmarks). Plots of this run: "
            + ", ".join(f"`bench/results/{p.name}`" for p in pngs) + " (not committed).\n\n"
            + CAVEATS + md)
    console.print(md, markup=False, highlight=False)
    console.print(f"took {meta['seconds']:.0f} s")
    console.print(f"wrote {RESULTS}/results.json, results.md, "
                  + ", ".join(p.name for p in pngs), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
