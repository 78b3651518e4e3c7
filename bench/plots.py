"""The plots of one run, from its rows: one PNG per benchmark, each
comparing the contenders of that benchmark side by side."""
from pathlib import Path

from .report import _med, _sel


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
        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        labels = [f"{r['method']}\n{r['swap_file']}" for r in rc]
        for ax, field, title in zip(axes, ("pages_per_s", "tlb_per_page", "cpu_s_per_gib",
                                           "memfree_gain_ratio"),
                                    ("pages/s", "TLB shootdowns per page", "CPU s per GiB",
                                     "MemFree gained / bytes reclaimed")):
            ax.bar(labels, [r.get(field) or 0 for r in rc],
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
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        rounds = sorted({r["round"] for r in f if r.get("round")})
        combos = [("seq", 1, {"round": n}, f"seq 1 thr\nround {n}") for n in rounds]
        combos += [("random", 1, {}, "random\n1 thr"), ("random", 4, {}, "random\n4 thr"),
                   ("seq", 4, {}, "seq 4 thr")]
        methods = [m for m in ("uffdsrv", "c-reference", "kernel-swap", "kernel-swap-cached")
                   if _sel(f, method=m)]
        w = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            for ax, field in zip(axes, ("pages_per_s", "p99_us", "cpu_s_per_gib")):
                vals = [_med(_sel(f, method=m, pattern=p, threads=t, **kw), field) or 0
                        for p, t, kw, _ in combos]
                ax.bar([k + (i - (len(methods) - 1) / 2) * w for k in range(len(combos))],
                       [max(v, 1e-6) for v in vals], w, label=m)
        for ax, title in zip(axes, ("pages/s (higher is better)", "p99 µs per fault (lower)",
                                    "CPU s of the serving side per GiB (lower)")):
            ax.set_xticks(range(len(combos)), [c[3] for c in combos], fontsize=8)
            ax.set_yscale("log")
            ax.set_title(title)
            ax.legend(fontsize=7)
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
    mg = _sel(rows, bench="manage")
    br = _sel(rows, bench="busy-reclaim")
    if mg or br:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"--{r['method']}\nmanaged / plain ops/s" for r in mg]
        vals = [r["ops_ratio"] or 0 for r in mg]
        labels += ["busy --malloc 2\nreclaimed / managed" for _ in br]
        vals += [r["reclaimed_ratio"] or 0 for r in br]
        ax.bar(labels, vals, color=["C0"] * len(mg) + ["C3"] * len(br))
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title("being managed: stress-ng (target >= 0.5, dotted)", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        made.append(outdir / "manage.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    bg = _sel(rows, bench="budget")
    if bg:
        made.append(_budget(plt, bg, outdir / "budget.png"))
    return made


BUDGET_METHODS = ("none", "kernel-swap", "kernel-zswap", "uffdsrv-disk", "uffdsrv-tiered")


def _budget(plt, bg, path: Path) -> Path:
    """Throughput relative to `none`, and memory in use over the budget,
    per method, grouped by workload and budget; a missing bar is a row that
    was skipped or failed (its note is in the table)."""
    groups = sorted({(r["workload"], r["budget"]) for r in bg},
                    key=lambda g: (g[0] != "zipf", g[1]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    w = 0.8 / len(BUDGET_METHODS)
    for i, m in enumerate(BUDGET_METHODS):
        rel, mem = [], []
        for wl, frac in groups:
            r = _sel(bg, workload=wl, budget=frac, method=m)
            e = r[0]["extra"] if r else {}
            rel.append(e.get("relative") or 0)
            mem.append(r[0]["memory_bytes"] / e["budget_bytes"]
                       if r and r[0]["memory_bytes"] and e.get("budget_bytes") else 0)
        xs = [k + (i - (len(BUDGET_METHODS) - 1) / 2) * w for k in range(len(groups))]
        axes[0].bar(xs, [max(v, 1e-4) for v in rel], w, label=m)
        axes[1].bar(xs, mem, w, label=m)
    for ax, title in zip(axes, ("ops/s relative to none (higher is better; log)",
                                "memory in use / budget (uffdsrv: program + server RSS)")):
        ax.set_xticks(range(len(groups)), [f"{wl}\n{frac:.0%}" for wl, frac in groups])
        ax.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center",
               ncol=len(BUDGET_METHODS), fontsize=8)
    axes[1].axhline(1.0, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
