"""Ratios, targets, the markdown table and the plots, from the rows of one run.

Every comparison is between rows of the same run on the same machine; where
a benchmark was repeated, the median over repetitions is compared.
"""
import math
import statistics
from pathlib import Path


def _sel(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _med(rows, field):
    vals = [r[field] for r in rows if isinstance(r.get(field), int | float)
            and math.isfinite(r[field])]
    return statistics.median(vals) if vals else None


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(rows) -> list[dict]:
    """Each: {"name", "value", "target", "op", "met", "a", "b", "note"}. value =
    a / b. met is None where a figure is missing."""
    out = []
    have = {r["bench"] for r in rows}

    def add(name, a, b, op=None, target=None, note="", invalid=False):
        """invalid: the rows behind it do not measure what the name says
        (note says why): a target is then not met, whatever the figure."""
        v = _ratio(a, b)
        met = None
        if v is not None and op:
            met = (v >= target if op == ">=" else v <= target) and not invalid
        out.append({"name": name, "value": v, "target": target, "op": op, "met": met,
                    "a": a, "b": b, "note": note})

    def absolute(name, v, op=None, target=None, note=""):
        met = None
        if v is not None and op:
            met = v >= target if op == ">=" else v <= target
        out.append({"name": name, "value": v, "target": target, "op": op, "met": met,
                    "a": None, "b": None, "note": "absolute, not a ratio"
                    + (f"; {note}" if note else "")})

    # zap
    if "zap" in have:
        busy = 1 if _sel(rows, bench="zap", threads=1) else 0
        for memory in ("anon", "uffd", "uffd+remove"):
            m = _sel(rows, bench="zap", method="madvise", memory=memory, threads=busy)
            p = _sel(rows, bench="zap", method="process_madvise", memory=memory, threads=busy,
                     vlen=1024)
            headline = memory == "anon"
            add(f"zap {memory}, {busy} busy, vlen 1024: madvise / process_madvise, us per range",
                _med(m, "us_per_range"), _med(p, "us_per_range"),
                ">=" if headline else None, 10 if headline else None)
            add(f"zap {memory}, {busy} busy, vlen 1024: madvise / process_madvise, median round",
                _med(m, "median_us_per_range"), _med(p, "median_us_per_range"))
            # No shootdown at all in the vectored run makes the ratio a lower
            # bound: count it as one.
            mt, pt = _med(m, "tlb"), _med(p, "tlb")
            note = ""
            if pt == 0 and p:
                pt, note = 1, "process_madvise had 0 shootdowns; counted as 1: a lower bound"
            mr = _med(m, "ranges")
            pr = _med(p, "ranges")
            add(f"zap {memory}, {busy} busy, vlen 1024: madvise / process_madvise, TLB per range",
                mt / mr if mt is not None and mr else None,
                pt / pr if pt is not None and pr else None,
                ">=" if headline else None, 300 if headline else None, note)
    if "reclaim" in have:
        _reclaim_ratios(rows, add, absolute)
    if "fault" in have:
        _fault_ratios(rows, add)
    if "manage" in have:
        for stressor in ("malloc", "fork", "mmap"):
            m = _sel(rows, bench="manage", method=stressor)
            add(f"manage stress-ng --{stressor}: bogo-ops/s, managed / plain",
                _med(m, "managed_ops_per_s"), _med(m, "plain_ops_per_s"), ">=", 0.5)
    if "busy-reclaim" in have:
        b = _sel(rows, bench="busy-reclaim")
        add("busy-reclaim (stress-ng --malloc 2 running): bytes reclaimed / managed",
            _med(b, "reclaimed_bytes"), _med(b, "managed_bytes"), ">=", 0.5,
            "; ".join(e for r in b for e in r.get("errors", []))[:200])
        add("busy-reclaim: bytes reclaimed / resident",
            _med(b, "reclaimed_bytes"), _med(b, "resident_bytes"))
    if "policy" in have:
        _policy_ratios(rows, add, out)
    if "budget" in have:
        _budget_ratios(rows, add)
    return out


def _budget_ratios(rows, add) -> None:
    """Issue 13's targets, from one run's budget rows."""
    def fig(workload, frac, method, field="ops_per_s"):
        r = _sel(rows, bench="budget", workload=workload, budget=frac, method=method)
        return (r[0].get(field) if field in r[0] else r[0]["extra"].get(field)) if r else None

    def best(workload, frac, methods):
        vals = [v for m in methods if (v := fig(workload, frac, m)) is not None]
        return max(vals) if vals else None
    for us, them in (("uffdsrv-disk", "kernel-swap"), ("uffdsrv-tiered", "kernel-zswap")):
        add(f"budget zipf 25%: ops/s, {us} / {them}", fig("zipf", 0.25, us),
            fig("zipf", 0.25, them), ">=", 1.0)
    add("budget redis 50%: GET/s, best uffdsrv / best kernel",
        best("redis", 0.5, ("uffdsrv-disk", "uffdsrv-tiered")),
        best("redis", 0.5, ("kernel-swap", "kernel-zswap")), ">=", 1.0)
    add("budget zipf 25%: compression ratio, RAM tier (stored / compressed bytes) / zswap "
        "(stored / pool_total_size)", fig("zipf", 0.25, "uffdsrv-tiered", "compression_ratio"),
        fig("zipf", 0.25, "kernel-zswap", "compression_ratio"), ">=", 0.95)
    t = _sel(rows, bench="budget", workload="zipf", budget=0.25, method="uffdsrv-tiered")
    add("budget zipf 25%: compression ratio over the whole pool, RAM tier / zswap",
        ((t[0]["extra"].get("tier") or {}).get("pool_ratio") if t else None),
        fig("zipf", 0.25, "kernel-zswap", "compression_ratio"))
    for us, them in (("uffdsrv-disk", "kernel-swap"), ("uffdsrv-tiered", "kernel-zswap")):
        add(f"budget zipf 25%: memory in use, {us} / {them}", fig("zipf", 0.25, us,
            "memory_bytes"), fig("zipf", 0.25, them, "memory_bytes"), "<=", 1.05,
            "uffdsrv: program RSS + server RSS; kernel: cgroup usage (+ zswap pool)")
        m, idle = fig("zipf", 0.25, us, "memory_bytes"), fig("zipf", 0.25, us,
                                                           "server_rss_idle_bytes")
        add(f"budget zipf 25%: memory in use less the idle server's RSS, {us} / {them}",
            m - idle if m is not None and idle is not None else None,
            fig("zipf", 0.25, them, "memory_bytes"))


def _reclaim_ratios(rows, add, absolute) -> None:
    for sf in ("reused", "fresh"):
        pm = _sel(rows, bench="reclaim", method="process_madvise", swap_file=sf)
        ma = _sel(rows, bench="reclaim", method="madvise", swap_file=sf)
        po = _sel(rows, bench="reclaim", method="pageout", swap_file=sf)
        short = "; ".join(
            f"{r['method']} reclaimed only {r['pages']} of {r['filled_pages']} pages"
            for r in pm + ma + po if r["pages"] < 0.9 * r.get("filled_pages", 0))
        absolute(f"reclaim ({sf} swap file): TLB per page, coalesced process_madvise",
                 _med(pm, "tlb_per_page"), "<=", 0.002)
        add(f"reclaim ({sf}): pages/s, uffdsrv (process_madvise) / kernel MADV_PAGEOUT",
            _med(pm, "pages_per_s"), _med(po, "pages_per_s"), ">=", 1.0, short,
            invalid=bool(short))
        absolute(f"reclaim ({sf}): MemFree gained / bytes reclaimed, uffdsrv",
                 _med(pm, "memfree_gain_ratio"), ">=", 0.9,
                 f"within {_med(pm, 'memfree_window_s')} s of reclaim returning; MemFree "
                 f"moved by {_fmt(_med(pm, 'memfree_noise_ratio'))} of it in as long "
                 "before, by itself")
        absolute(f"reclaim ({sf}): MemFree + per-CPU free lists gained / bytes reclaimed, "
                 "uffdsrv", _med(pm, "free_gain_ratio"))
        absolute(f"reclaim ({sf}): page-cache growth / bytes reclaimed, uffdsrv",
                 _med(pm, "page_cache_growth_ratio"), "<=", 0.1)
        absolute(f"reclaim ({sf}): swap file's pages in the page cache / bytes reclaimed, "
                 "uffdsrv (mincore)", _med(pm, "swap_file_cached_ratio"))
        absolute(f"reclaim ({sf}): MemFree gained / bytes reclaimed, MADV_PAGEOUT",
                 _med(po, "memfree_gain_ratio"))
        absolute(f"reclaim ({sf}): swap-cache growth / bytes reclaimed, MADV_PAGEOUT",
                 _med(po, "swap_cache_growth_ratio"))
        add(f"reclaim ({sf}): pages/s, process_madvise / madvise zaps",
            _med(pm, "pages_per_s"), _med(ma, "pages_per_s"))
        add(f"reclaim ({sf}): TLB per page, madvise / process_madvise zaps",
            _med(ma, "tlb_per_page"), _med(pm, "tlb_per_page"))
        add(f"reclaim ({sf}): CPU s per GiB, uffdsrv (process_madvise) / MADV_PAGEOUT",
            _med(pm, "cpu_s_per_gib"), _med(po, "cpu_s_per_gib"))


def _device_note(k) -> str:
    """Says so when the kernel-swap rows were not all reads from the device."""
    bad = [r for r in k if not r.get("major_faults")
           or r.get("still_in_swap_cache", 0) > 0.05 * r.get("pages", 1)]
    return (f"{len(bad)} of {len(k)} kernel-swap walks were not from the device "
            "(no major faults, or > 5% still in the swap cache)" if bad else "")


def _unreclaimed(rows) -> str:
    """Says so when a walk's memory had not been reclaimed before it: such
    a walk measures touching resident pages, not fault-in."""
    bad = [r for r in rows if r.get("reclaimed_pages", 0) < 0.9 * r.get("pages", 0)]
    if not bad:
        return ""
    r = bad[0]
    return (f"NOT a fault-in figure: {r['method']} had reclaimed only {r['reclaimed_pages']} "
            f"of {r['pages']} pages before {len(bad)} of its walks")


def _fault_ratios(rows, add0) -> None:
    f = _sel(rows, bench="fault")

    def fig(method, field, **kw):
        return _med(_sel(f, method=method, **kw), field)

    def add(name, a, b, op=None, target=None, note="", methods=(), **kw):
        """a, b: (method, field); kw selects the rows of both."""
        bad = "; ".join(filter(None, (_unreclaimed(_sel(f, method=m, **kw)) for m in methods)))
        add0(name, fig(*a, **kw), fig(*b, **kw), op, target,
             "; ".join(filter(None, (note, bad))), invalid=bool(bad))
    for threads in (1, 4):
        kw = {"pattern": "random", "threads": threads}
        both = ("uffdsrv", "c-reference")
        add(f"fault random, {threads} thr: pages/s, uffdsrv / c-reference",
            ("uffdsrv", "pages_per_s"), ("c-reference", "pages_per_s"), ">=", 1.0,
            methods=both, **kw)
        add(f"fault random, {threads} thr: p99 us, uffdsrv / c-reference",
            ("uffdsrv", "p99_us"), ("c-reference", "p99_us"),
            "<=" if threads == 1 else None, 1.5 if threads == 1 else None, methods=both, **kw)
        add(f"fault random, {threads} thr: p50 us, uffdsrv / c-reference",
            ("uffdsrv", "p50_us"), ("c-reference", "p50_us"), methods=both, **kw)
        add(f"fault random, {threads} thr: CPU s per GiB, uffdsrv / c-reference",
            ("uffdsrv", "cpu_s_per_gib"), ("c-reference", "cpu_s_per_gib"), "<=", 2.0,
            methods=both, **kw)
        add(f"fault random, {threads} thr: pages/s, uffdsrv / kernel-swap",
            ("uffdsrv", "pages_per_s"), ("kernel-swap", "pages_per_s"),
            note=_device_note(_sel(f, method="kernel-swap", **kw)),
            methods=("uffdsrv", "kernel-swap"), **kw)
    rounds = sorted({r["round"] for r in f if r.get("round")})
    for rnd in rounds:
        kw = {"pattern": "seq", "threads": 1, "round": rnd}
        add(f"fault seq, 1 thr, round {rnd}: pages/s, uffdsrv / kernel-swap",
            ("uffdsrv", "pages_per_s"), ("kernel-swap", "pages_per_s"), ">=", 1.0,
            _device_note(_sel(f, method="kernel-swap", **kw)),
            methods=("uffdsrv", "kernel-swap"), **kw)
        add(f"fault seq, 1 thr, round {rnd}: pages/s, uffdsrv / kernel-swap-cached",
            ("uffdsrv", "pages_per_s"), ("kernel-swap-cached", "pages_per_s"),
            methods=("uffdsrv",), **kw)
        add(f"fault seq, 1 thr, round {rnd}: pages/s, uffdsrv / c-reference",
            ("uffdsrv", "pages_per_s"), ("c-reference", "pages_per_s"),
            methods=("uffdsrv", "c-reference"), **kw)
    if rounds:
        kw = {"pattern": "seq", "threads": 1}
        add("fault seq, 1 thr: CPU s per GiB, uffdsrv / c-reference (median of rounds)",
            ("uffdsrv", "cpu_s_per_gib"), ("c-reference", "cpu_s_per_gib"), "<=", 2.0,
            methods=("uffdsrv", "c-reference"), **kw)
        for m in ("uffdsrv", "kernel-swap"):
            add0(f"fault seq, 1 thr: pages/s, {m} round {rounds[-1]} / round 1 "
                 "(readahead decay)", fig(m, "pages_per_s", round=rounds[-1], **kw),
                 fig(m, "pages_per_s", round=1, **kw), note=_unreclaimed(_sel(f, method=m)))
    kw = {"pattern": "seq", "threads": 4}
    for other in ("c-reference", "kernel-swap"):
        add(f"fault seq, 4 thr: pages/s, uffdsrv / {other} (median of rounds)",
            ("uffdsrv", "pages_per_s"), (other, "pages_per_s"), methods=("uffdsrv", other), **kw)
    kw = {"pattern": "random", "threads": 1}
    add("fault random, 1 thr: pages/s, c-reference / kernel-swap (same device)",
        ("c-reference", "pages_per_s"), ("kernel-swap", "pages_per_s"),
        methods=("c-reference", "kernel-swap"), **kw)
    add("fault random, 1 thr: CPU s per GiB, uffdsrv / kernel-swap",
        ("uffdsrv", "cpu_s_per_gib"), ("kernel-swap", "cpu_s_per_gib"),
        methods=("uffdsrv", "kernel-swap"), **kw)


def _policy_ratios(rows, add, out) -> None:
    """The two goals of the default policy, then the others for comparison."""
    p = _sel(rows, bench="policy")

    def fig(method, pattern, field):
        return _med(_sel(p, method=method, pattern=pattern), field)
    add("policy zipf: refaults per 1000 accesses, coldest / fifo",
        fig("coldest", "zipf", "refaults_per_1000"), fig("fifo", "zipf", "refaults_per_1000"),
        "<=", 0.5)
    v = fig("coldest", "seq", "pages_per_swap_fault")
    out.append({"name": "policy seq: pages per fault from swap, coldest (the default)",
                "value": v, "target": 4, "op": ">=", "met": v >= 4 if v is not None else None,
                "a": None, "b": None, "note": "absolute, not a ratio"})
    add("policy zipf: refaults per 1000 accesses, random / fifo",
        fig("random", "zipf", "refaults_per_1000"), fig("fifo", "zipf", "refaults_per_1000"))
    add("policy zipf: accesses/s, coldest / fifo",
        fig("coldest", "zipf", "accesses_per_s"), fig("fifo", "zipf", "accesses_per_s"))
    add("policy seq: refaults per 1000 accesses, coldest / fifo",
        fig("coldest", "seq", "refaults_per_1000"), fig("fifo", "seq", "refaults_per_1000"))
    add("policy seq: pages per fault from swap, coldest / fifo",
        fig("coldest", "seq", "pages_per_swap_fault"), fig("fifo", "seq", "pages_per_swap_fault"))
    add("policy seq: accesses/s, coldest / fifo",
        fig("coldest", "seq", "accesses_per_s"), fig("fifo", "seq", "accesses_per_s"))


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(head, body) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in body]
    return lines


def markdown(rows, rats, meta) -> str:
    md = [f"Machine: {meta['machine']}", ""]
    if meta.get("kernel_features"):
        md += [f"Kernel {meta.get('kernel', '')}: {meta['kernel_features']}", ""]
    md += [f"Skipped: {why}" for why in meta.get("skipped", ())]
    md += [f"Command: `{meta['command']}`", "",
          f"Started {meta['started']}, took {meta['seconds']:.0f} s.", ""]
    md += ["### Targets", ""]
    tg = [r for r in rats if r["op"]]
    md += _table(["comparison", "measured", "target", "met"],
                 [[r["name"] + (f" ({r['note']})" if r["note"] else ""), r["value"],
                   f"{r['op']} {r['target']}", {True: "yes", False: "**no**", None: "–"}[r["met"]]]
                  for r in tg])
    md += ["", "### All ratios (a / b, same run)", ""]
    md += _table(["comparison", "ratio", "a", "b"],
                 [[r["name"] + (f" ({r['note']})" if r["note"] else ""), r["value"], r["a"], r["b"]]
                  for r in rats if not r["op"]])
    z = _sel(rows, bench="zap")
    if z:
        md += ["", "### zap (µs and TLB shootdowns per single-page range)", ""]
        md += _table(["memory", "busy thr", "method", "vlen", "µs/range", "median µs/range",
                      "TLB/range", "TLB/call"],
                     [[r["memory"], r["threads"], r["method"], r["vlen"], r["us_per_range"],
                       r["median_us_per_range"], r["tlb_per_range"], r["tlb_per_call"]]
                      for r in z])
    rc = _sel(rows, bench="reclaim")
    if rc:
        md += ["", "### reclaim (workload with every 2nd page filled, one busy thread; "
               "MemFree gained within the window after reclaim returned, and page-cache "
               "growth, over the bytes reclaimed)", ""]
        md += _table(["method", "swap file", "pages", "pages/s", "TLB/page", "CPU s/GiB",
                      "MemFree gain ratio", "+ per-CPU lists", "page-cache growth ratio",
                      "swap-cache growth ratio", "MemFree noise ratio",
                      "swap file cached ratio", "io mode"],
                     [[r["method"], r["swap_file"], r["pages"], r["pages_per_s"],
                       r["tlb_per_page"], r["cpu_s_per_gib"], r.get("memfree_gain_ratio"),
                       r.get("free_gain_ratio"),
                       r.get("page_cache_growth_ratio"), r.get("swap_cache_growth_ratio"),
                       r.get("memfree_noise_ratio"),
                       r.get("swap_file_cached_ratio"), r.get("io_mode", "–")] for r in rc])
    f = _sel(rows, bench="fault")
    if f:
        md += ["", "### fault-in (p50/p99 over accesses that faulted; CPU of the serving "
               "side per GiB; major faults of the walk, from /proc/PID/stat; SwapCached "
               "just before it)", ""]
        md += _table(["method", "pattern", "threads", "round", "rep", "pages/s", "faults",
                      "p50 µs", "p99 µs", "access p99 µs", "CPU s/GiB", "major faults",
                      "SwapCached MiB", "left in swap cache", "swap file pages cached"],
                     [[r["method"], r["pattern"], r["threads"], r.get("round", "–"),
                       r.get("rep", 0), r["pages_per_s"], r["faults"], r["p50_us"],
                       r["p99_us"], r["access_p99_us"], r.get("cpu_s_per_gib"),
                       r.get("major_faults"), r.get("swapcached_before_bytes", 0) / (1 << 20),
                       r.get("still_in_swap_cache", "–"),
                       r.get("swap_file_cached_pages", "–")] for r in f])
    mg = _sel(rows, bench="manage")
    if mg:
        md += ["", "### manage (stress-ng, one instance, plain and under `uffdsrv run`, "
               "no reclaim running; bogo-ops/s over real time)", ""]
        md += _table(["stressor", "seconds", "plain ops/s", "managed ops/s", "ratio",
                      "server CPU s", "clients seen", "managed MiB at peak"],
                     [[r["method"], r["seconds"], r["plain_ops_per_s"], r["managed_ops_per_s"],
                       r["ops_ratio"], r["server_cpu_s"], r["clients_seen"],
                       r["managed_bytes_peak"] / (1 << 20)] for r in mg])
    br = _sel(rows, bench="busy-reclaim")
    if br:
        md += ["", "### busy-reclaim (`uffdsrv reclaim` of each worker of a running "
               "stress-ng --malloc 2)", ""]
        md += _table(["program", "processes", "managed MiB", "resident MiB", "reclaimed MiB",
                      "reclaimed / managed", "seconds", "errors"],
                     [[r["method"], r["processes"], r["managed_bytes"] / (1 << 20),
                       r["resident_bytes"] / (1 << 20), r["reclaimed_bytes"] / (1 << 20),
                       r["reclaimed_ratio"], r["seconds"],
                       "; ".join(r["errors"]) or "none"] for r in br])
    pol = _sel(rows, bench="policy")
    if pol:
        r0 = pol[0]
        md += ["", f"### policy ({r0['mib']} MiB held at {r0['budget_fraction']:.0%} by "
               "`uffdsrv limit`; refaults = faults served from swap, per 1000 accesses; "
               "after a warm-up)", ""]
        md += _table(["pattern", "policy", "refaults/1000", "accesses/s",
                      "pages per swap fault", "warm-up refaults/1000", "accesses", "refaults",
                      "readahead pages"],
                     [[r["pattern"], r["method"], r["refaults_per_1000"], r["accesses_per_s"],
                       r["pages_per_swap_fault"], r["warmup_refaults_per_1000"], r["accesses"],
                       r["refaults"], r["readahead_pages"]] for r in pol])
    bg = _sel(rows, bench="budget")
    if bg:
        md += ["", "### budget (the same workload held at a share of its footprint; "
               "relative = ops/s over `none`'s; memory: cgroup usage (+ zswap pool) for the "
               "kernel, program + server RSS for uffdsrv; major faults: the program's for "
               "the kernel, faults served from swap or the RAM tier for uffdsrv)", ""]
        md += _table(["workload", "budget", "method", "ops/s", "relative", "p99 µs",
                      "major faults", "memory MiB", "budget MiB", "compression", "note"],
                     [[r["workload"], f"{r['budget']:.0%}", r["method"], r["ops_per_s"],
                       r["extra"].get("relative"), r["p99_us"], r["major_faults"],
                       r["memory_bytes"] / (1 << 20) if r["memory_bytes"] else None,
                       (r["extra"].get("budget_bytes") or 0) / (1 << 20),
                       r["compression_ratio"],
                       r["extra"].get("skipped") or r["extra"].get("failed") or ""]
                      for r in bg])
    return "\n".join(md) + "\n"


def plots(rows, outdir: Path) -> list[Path]:
    from .plots import plots as draw
    return draw(rows, outdir)
