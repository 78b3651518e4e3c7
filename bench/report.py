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

    def add(name, a, b, op=None, target=None, note=""):
        v = _ratio(a, b)
        met = None
        if v is not None and op:
            met = v >= target if op == ">=" else v <= target
        out.append({"name": name, "value": v, "target": target, "op": op, "met": met,
                    "a": a, "b": b, "note": note})

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
    # reclaim
    if "reclaim" in have:
        for sf in ("reused", "fresh"):
            pm = _sel(rows, bench="reclaim", method="process_madvise", swap_file=sf)
            ma = _sel(rows, bench="reclaim", method="madvise", swap_file=sf)
            po = _sel(rows, bench="reclaim", method="pageout", swap_file=sf)
            steady = sf == "reused"
            out.append({"name": f"reclaim ({sf} swap file): TLB per page, "
                                "coalesced process_madvise",
                        "value": _med(pm, "tlb_per_page"), "target": 0.002 if steady else None,
                        "op": "<=" if steady else None,
                        "met": (_med(pm, "tlb_per_page") <= 0.002
                                if steady and _med(pm, "tlb_per_page") is not None else None),
                        "a": None, "b": None, "note": "absolute, not a ratio"})
            add(f"reclaim ({sf}): pages/s, uffdsrv (process_madvise) / kernel MADV_PAGEOUT",
                _med(pm, "pages_per_s"), _med(po, "pages_per_s"),
                ">=" if steady else None, 1.0 if steady else None)
            add(f"reclaim ({sf}): pages/s, process_madvise / madvise zaps",
                _med(pm, "pages_per_s"), _med(ma, "pages_per_s"))
            add(f"reclaim ({sf}): TLB per page, madvise / process_madvise zaps",
                _med(ma, "tlb_per_page"), _med(pm, "tlb_per_page"))
            add(f"reclaim ({sf}): CPU s per GiB, uffdsrv (process_madvise) / MADV_PAGEOUT",
                _med(pm, "cpu_s_per_gib"), _med(po, "cpu_s_per_gib"))
    # fault
    if "fault" in have:
        for pattern in ("random", "seq"):
            for threads in (1, 4):
                u = _sel(rows, bench="fault", method="uffdsrv", pattern=pattern,
                         threads=threads)
                c = _sel(rows, bench="fault", method="c-reference", pattern=pattern,
                         threads=threads)
                k = _sel(rows, bench="fault", method="kernel-swap", pattern=pattern,
                         threads=threads)
                t_ref = pattern == "random" and threads == 1
                t_k = pattern == "seq" and threads == 1
                add(f"fault {pattern}, {threads} thr: pages/s, uffdsrv / c-reference",
                    _med(u, "pages_per_s"), _med(c, "pages_per_s"),
                    ">=" if t_ref else None, 0.8 if t_ref else None)
                add(f"fault {pattern}, {threads} thr: p99 us, uffdsrv / c-reference",
                    _med(u, "p99_us"), _med(c, "p99_us"),
                    "<=" if t_ref else None, 1.5 if t_ref else None)
                add(f"fault {pattern}, {threads} thr: p50 us, uffdsrv / c-reference",
                    _med(u, "p50_us"), _med(c, "p50_us"))
                add(f"fault {pattern}, {threads} thr: pages/s, uffdsrv / kernel-swap",
                    _med(u, "pages_per_s"), _med(k, "pages_per_s"),
                    ">=" if t_k else None, 1.0 if t_k else None,
                    "kernel-swap pages were still in the swap cache (minor faults)"
                    if any(r.get("still_in_swap_cache") for r in k) else "")
    if "policy" in have:
        _policy_ratios(rows, add, out)
    return out


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
    md = [f"Machine: {meta['machine']}", "", f"Command: `{meta['command']}`", "",
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
        md += ["", "### reclaim (workload with every 2nd page filled, one busy thread)", ""]
        md += _table(["method", "swap file", "pages", "pages/s", "TLB/page", "CPU s/GiB"],
                     [[r["method"], r["swap_file"], r["pages"], r["pages_per_s"],
                       r["tlb_per_page"], r["cpu_s_per_gib"]] for r in rc])
    f = _sel(rows, bench="fault")
    if f:
        md += ["", "### fault-in (p50/p99 over accesses that faulted)", ""]
        md += _table(["method", "pattern", "threads", "rep", "pages/s", "faults", "p50 µs",
                      "p99 µs", "access p99 µs"],
                     [[r["method"], r["pattern"], r["threads"], r.get("rep", 0),
                       r["pages_per_s"], r["faults"], r["p50_us"], r["p99_us"],
                       r["access_p99_us"]] for r in f])
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
    return "\n".join(md) + "\n"


def plots(rows, outdir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    z = _sel(rows, bench="zap")
    if z:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for memory in ("anon", "uffd", "uffd+remove"):
            for busy in sorted({r["threads"] for r in z}):
                pm = sorted(_sel(z, method="process_madvise", memory=memory, threads=busy),
                            key=lambda r: r["vlen"])
                ma = _sel(z, method="madvise", memory=memory, threads=busy)
                if not pm:
                    continue
                label = f"{memory}, {busy} busy"
                for ax, field in zip(axes, ("us_per_range", "tlb_per_range")):
                    line, = ax.plot([r["vlen"] for r in pm],
                                    [max(r[field], 1e-5) for r in pm], marker="o", label=label)
                    if ma:
                        ax.axhline(max(ma[0][field], 1e-5), color=line.get_color(),
                                   linestyle=":", linewidth=1)
        for ax, title in zip(axes, ("µs per range", "TLB shootdowns per range")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("process_madvise vlen (dotted: madvise, one range per call)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        made.append(outdir / "zap.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    rc = _sel(rows, bench="reclaim")
    if rc:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        labels = [f"{r['method']}\n{r['swap_file']}" for r in rc]
        for ax, field, title in zip(axes, ("pages_per_s", "tlb_per_page", "cpu_s_per_gib"),
                                    ("pages/s", "TLB shootdowns per page", "CPU s per GiB")):
            ax.bar(labels, [r[field] for r in rc],
                   color=["C0" if r["method"] == "process_madvise" else
                          "C1" if r["method"] == "madvise" else "C2" for r in rc])
            ax.set_title(title)
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        made.append(outdir / "reclaim.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    f = _sel(rows, bench="fault")
    if f:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        combos = [(p, t) for p in ("seq", "random") for t in (1, 4)]
        methods = ("uffdsrv", "c-reference", "kernel-swap")
        w = 0.27
        for i, m in enumerate(methods):
            for ax, field in zip(axes, ("pages_per_s", "p99_us")):
                vals = [_med(_sel(f, method=m, pattern=p, threads=t), field) or 0
                        for p, t in combos]
                ax.bar([k + (i - 1) * w for k in range(len(combos))], vals, w, label=m)
        for ax, title in zip(axes, ("pages/s (higher is better)", "p99 µs per fault (lower)")):
            ax.set_xticks(range(len(combos)), [f"{p}, {t} thr" for p, t in combos])
            ax.set_yscale("log")
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(outdir / "fault.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    pol = _sel(rows, bench="policy")
    if pol:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        patterns = [p for p in ("zipf", "seq") if _sel(pol, pattern=p)]
        methods = [m for m in ("coldest", "fifo", "random") if _sel(pol, method=m)]
        w = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            for ax, field in zip(axes, ("refaults_per_1000", "accesses_per_s",
                                        "pages_per_swap_fault")):
                vals = [_med(_sel(pol, method=m, pattern=p), field) or 0 for p in patterns]
                ax.bar([k + (i - (len(methods) - 1) / 2) * w for k in range(len(patterns))],
                       vals, w, label=m)
        for ax, title in zip(axes, ("refaults per 1000 accesses (lower is better)",
                                    "accesses/s (higher)", "pages per fault from swap")):
            ax.set_xticks(range(len(patterns)), patterns)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
        axes[1].set_yscale("log")
        axes[2].axhline(4, color="grey", linestyle=":", linewidth=1)
        fig.suptitle(f"{pol[0]['mib']} MiB at a budget of {pol[0]['budget_fraction']:.0%}",
                     fontsize=10)
        fig.tight_layout()
        made.append(outdir / "policy.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made
