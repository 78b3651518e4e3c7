"""`uffdsrv top`: the dashboard's figures in a terminal.

    uffdsrv top --socket PATH [--metrics-url URL] [--interval S] [--once]

Each refresh asks the server for its `status` over the control socket
(clients, their managed/resident/swapped bytes, the swap file) and, given
--metrics-url, scrapes /metrics for the rest: faults by kind and their
service time, reclaim and swap I/O, zap efficiency, the ring, errors.
Rates are the difference between two refreshes. The machine's memory
(/proc/meminfo) is shown against the moment top started: MemFree gained
is the memory the server gave back to the machine, shown beside the
managed programs' resident bytes and the page cache's growth (a swap file
written through the page cache frees nothing: the pages only move from the
program into the cache). On a terminal the view is
drawn with rich and redrawn in place; otherwise (a pipe, a log) each
refresh is printed as plain lines. --once takes two samples --interval
apart, prints one view and exits.
"""
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from . import ctl
from .system import procfs

MIB = 1 << 20


class ScrapeError(Exception):
    """/metrics could not be read; str(e) says where and why."""


@dataclass
class Sample:
    at: float
    status: dict
    metrics: dict = field(default_factory=dict)  # sample name -> {labels tuple: value}
    meminfo: dict = field(default_factory=dict)  # /proc/meminfo, bytes


def metrics_url(text: str) -> str:
    url = text if "://" in text else f"http://{text}"
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url += "/metrics"
    return url


def scrape(url: str, timeout: float = 5) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ScrapeError(f"cannot read metrics from {url}: {reason}") from None
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(conn: ctl.Connection, url: str | None) -> Sample:
    status = conn.request("status")
    return Sample(time.monotonic(), status, scrape(url) if url else {}, procfs.meminfo())


# --- figures ---------------------------------------------------------------------
def _total(m: dict, name: str, **match) -> float:
    return sum(v for labels, v in m.get(name, {}).items()
               if all(dict(labels).get(k) == w for k, w in match.items()))


def _by(m: dict, name: str, label: str) -> dict:
    out: dict = {}
    for labels, v in m.get(name, {}).items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


def _rate(new: Sample, old: Sample | None, name: str, **match) -> float | None:
    if old is None or name not in new.metrics or new.at <= old.at:
        return None
    d = _total(new.metrics, name, **match) - _total(old.metrics, name, **match)
    return max(d, 0.0) / (new.at - old.at)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def quantile(q: float, new: Sample, old: Sample | None, name: str) -> float | None:
    """Like PromQL's histogram_quantile over the increase between samples."""
    bucket = f"{name}_bucket"
    if bucket not in new.metrics:
        return None

    def cum(s):
        out: dict = {}
        for labels, v in s.metrics.get(bucket, {}).items():
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + v
        return out
    now = cum(new)
    before = cum(old) if old is not None else {}
    bounds = sorted(now)
    counts = [now[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, counts):
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


def memory(new: Sample, ref: Sample | None) -> dict:
    """The machine's memory against the reference sample: MemFree gained
    (what was given back), page cache growth, and the managed programs'
    resident bytes then and now. None where /proc/meminfo lacks it."""
    def resident(s: Sample) -> int:
        return sum(c["resident_bytes"] for c in s.status["clients"])

    def delta(key: str) -> int | None:
        if ref is None or key not in new.meminfo or key not in ref.meminfo:
            return None
        return new.meminfo[key] - ref.meminfo[key]
    return {"memfree_bytes": new.meminfo.get("MemFree"),
            "memfree_gained_bytes": delta("MemFree"),
            "page_cache_growth_bytes": delta("Cached"),
            "resident_bytes": resident(new),
            "resident_change_bytes": None if ref is None else resident(new) - resident(ref)}


def tier_rates(new: Sample, old: Sample | None) -> dict:
    """Per second between two status replies: the RAM tier's hits,
    misses and evictions (None: no tier, or one sample only)."""
    a, b = (old.status.get("tier") if old else None), new.status.get("tier")
    dt = new.at - old.at if old else 0
    if not a or not b or dt <= 0:
        return {}
    return {k: max(b[k] - a[k], 0) / dt for k in ("hits", "misses", "evicted_pages")}


def figures(new: Sample, old: Sample | None, ref: Sample | None = None) -> dict:
    """Everything shown, as plain values (None: not known yet). Rates are
    from old to new; the machine's memory from ref (default: old) to new."""
    m = new.metrics
    st = new.status
    old_faults = {c["pid"]: c["faults_total"] for c in (old.status["clients"] if old else [])}
    dt = new.at - old.at if old else 0
    clients = []
    for c in sorted(st["clients"], key=lambda c: -c["managed_bytes"]):
        rate = None
        if dt > 0 and c["pid"] in old_faults:
            rate = max(c["faults_total"] - old_faults[c["pid"]], 0) / dt
        clients.append({**c, "faults_per_second": rate})
    f: dict = {"clients": clients, "swap": st["swap"], "has_metrics": bool(m),
               "memory": memory(new, ref if ref is not None else old),
               "tier": st.get("tier"), "tier_rates": tier_rates(new, old),
               "memory_saved_bytes": st.get("memory_saved_bytes"),
               "pages_lost_to_io_errors": st.get("pages_lost_to_io_errors", 0)}
    if not m:
        return f
    f["version"] = next((dict(k).get("version") for k in m.get("uffdsrv_build_info", {})), "?")
    kinds = _by(m, "uffdsrv_faults_total", "kind")
    f["faults_per_second"] = {k: _rate(new, old, "uffdsrv_faults_total", kind=k)
                              for k in sorted(kinds)}
    f["faults_total"] = kinds
    f["fault_p50"] = quantile(0.5, new, old, "uffdsrv_fault_duration_seconds")
    f["fault_p99"] = quantile(0.99, new, old, "uffdsrv_fault_duration_seconds")
    reclaimed = _rate(new, old, "uffdsrv_reclaimed_pages_total")
    f["reclaimed_pages_per_second"] = reclaimed
    f["swapped_in_pages_per_second"] = _rate(new, old, "uffdsrv_swapped_in_pages_total")
    f["swap_write_bytes_per_second"] = _rate(new, old, "uffdsrv_swap_written_bytes_total")
    f["swap_read_bytes_per_second"] = _rate(new, old, "uffdsrv_swap_read_bytes_total")
    f["reclaim_batch_mean_seconds"] = _ratio(
        _rate(new, old, "uffdsrv_reclaim_batch_duration_seconds_sum"),
        _rate(new, old, "uffdsrv_reclaim_batch_duration_seconds_count"))
    f["ranges_per_zap_call"] = _ratio(_rate(new, old, "uffdsrv_zap_ranges_total"),
                                      _rate(new, old, "uffdsrv_zap_calls_total"))
    f["tlb_shootdowns_per_reclaimed_page"] = _ratio(
        _rate(new, old, "uffdsrv_tlb_shootdowns_total"), reclaimed)
    f["ring_submissions_per_second"] = _rate(new, old, "uffdsrv_ring_submissions_total")
    f["ring_entries_per_submission"] = _ratio(
        _rate(new, old, "uffdsrv_ring_entries_submitted_total"),
        f["ring_submissions_per_second"])
    errors = _by(m, "uffdsrv_errors_total", "kind")
    f["errors_total"] = {k: v for k, v in sorted(errors.items()) if v}
    f["errors_per_second"] = {k: _rate(new, old, "uffdsrv_errors_total", kind=k)
                              for k in f["errors_total"]}
    return f


# --- formatting --------------------------------------------------------------------
def _n(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None or math.isnan(v) else fmt.format(v)


def _bytes(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.1f} MiB"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:+,.1f} MiB"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:,.0f} µs"
    return f"{v * 1e3:,.1f} ms" if v < 1 else f"{v:,.2f} s"


def summary_lines(f: dict) -> list[str]:
    """The non-client figures, one `name: values` line each."""
    s = f["swap"]
    head = f"swap: {_bytes(s['used_bytes'])} of {_bytes(s['size_bytes'])} used ({s['path']})"
    mem = f["memory"]
    t, tr = f.get("tier"), f.get("tier_rates") or {}
    tier = "ram tier: off" if not t else (
        f"ram tier: {_bytes(t['pool_bytes'])} of {_bytes(t['cap_bytes'])} ({t['codec']}), "
        f"{t['stored_pages']:,} pages ({t['same_pages']:,} same-filled), ratio "
        f"{_n(t['compression_ratio'], '{:.2f}')}  hits {_n(tr.get('hits'))}/s  "
        f"misses {_n(tr.get('misses'))}/s  evicted {_n(tr.get('evicted_pages'))}/s  "
        f"rejected {t['rejected_pages']:,}  saved net of the pool "
        f"{_bytes(f.get('memory_saved_bytes'))}")
    lines = [head, tier,
             f"memory: MemFree {_bytes(mem['memfree_bytes'])}, "
             f"given back {_signed(mem['memfree_gained_bytes'])}  "
             f"page cache {_signed(mem['page_cache_growth_bytes'])}  "
             f"managed resident {_bytes(mem['resident_bytes'])} "
             f"({_signed(mem['resident_change_bytes'])}) since start"]
    # a zap unanswered (a stopped or frozen program): not reclaimed until it is
    waiting = [str(c["pid"]) for c in f["clients"] if c.get("zap_pending")]
    if waiting:
        lines.append("zap unanswered: pid " + ", ".join(waiting))
    if f.get("pages_lost_to_io_errors"):
        lines.append(f"pages lost to swap read errors (SIGBUS): {f['pages_lost_to_io_errors']:,}")
    if not f["has_metrics"]:
        return lines + ["metrics: not scraped (give --metrics-url to see rates)"]
    fps = f["faults_per_second"]
    lines += [
        "faults/s: " + ("  ".join(f"{k} {_n(v)}" for k, v in fps.items() if k) or "-"),
        f"fault time: p50 {_secs(f['fault_p50'])}  p99 {_secs(f['fault_p99'])}",
        f"reclaim: {_n(f['reclaimed_pages_per_second'])} pages/s  "
        f"faulted in: {_n(f['swapped_in_pages_per_second'])} pages/s  "
        f"batch mean {_secs(f['reclaim_batch_mean_seconds'])}",
        f"swap io: write {_bytes(f['swap_write_bytes_per_second'])}/s  "
        f"read {_bytes(f['swap_read_bytes_per_second'])}/s",
        f"zap: {_n(f['ranges_per_zap_call'], '{:,.1f}')} ranges/call  "
        f"{_n(f['tlb_shootdowns_per_reclaimed_page'], '{:.4f}')} TLB shootdowns/reclaimed page",
        f"ring: {_n(f['ring_submissions_per_second'])} submissions/s  "
        f"{_n(f['ring_entries_per_submission'], '{:.2f}')} entries/submission",
        "errors: " + ("  ".join(f"{k} {v:,.0f} ({_n(f['errors_per_second'][k], '{:,.1f}')}/s)"
                                for k, v in f["errors_total"].items()) or "none"),
    ]
    return lines


CLIENT_HEADS = ("PID", "COMM", "MANAGED", "RESIDENT", "SWAPPED", "FAULTS", "FAULTS/s")


def client_rows(f: dict) -> list[tuple[str, ...]]:
    return [(str(c["pid"]), c["comm"][:16], _bytes(c["managed_bytes"]),
             _bytes(c["resident_bytes"]), _bytes(c["swapped_bytes"]),
             f"{c['faults_total']:,}", _n(c["faults_per_second"])) for c in f["clients"]]


def plain(f: dict) -> str:
    title = f"uffdsrv {f.get('version', '')}".rstrip()
    out = [f"{title}  clients: {len(f['clients'])}  at {time.strftime('%H:%M:%S')}"]
    rows = [CLIENT_HEADS, *client_rows(f)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(CLIENT_HEADS))]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    out += summary_lines(f)
    return "\n".join(out)


def rich_view(f: dict):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    t = Table(expand=True, box=None, header_style="bold")
    for i, h in enumerate(CLIENT_HEADS):
        t.add_column(h, justify="left" if i == 1 else "right")
    for r in client_rows(f):
        t.add_row(*r)
    if not f["clients"]:
        t.add_row("", "no managed processes", *[""] * (len(CLIENT_HEADS) - 2))
    s = Table.grid(padding=(0, 2))
    s.add_column(style="bold cyan", justify="right")
    s.add_column()
    for line in summary_lines(f):
        k, _, v = line.partition(": ")
        s.add_row(k, v)
    n = len(f["clients"])
    title = f"uffdsrv {f.get('version', '')}  ·  {n} client{'' if n == 1 else 's'}  ·  " \
            f"{time.strftime('%H:%M:%S')}"
    return Panel(Group(t, "", s), title=title, title_align="left")


# --- the command ----------------------------------------------------------------------
def run(socket: str, url: str | None, interval: float, once: bool, out=None) -> int:
    out = out or sys.stdout
    url = metrics_url(url) if url else None
    with ctl.Connection(socket, timeout=30) as conn:
        return _loop(conn, url, interval, once, out)


def _loop(conn: ctl.Connection, url: str | None, interval: float, once: bool, out) -> int:
    tty = out.isatty()
    ref = old = sample(conn, url)  # ref: where "since start" counts from
    if once:
        time.sleep(interval)
        new = sample(conn, url)
        f = figures(new, old, ref)
        if tty:
            from rich.console import Console
            Console(file=out).print(rich_view(f))
        else:
            print(plain(f), file=out, flush=True)
        return 0
    if not tty:
        while True:
            time.sleep(interval)
            new = sample(conn, url)
            print(plain(figures(new, old, ref)) + "\n", file=out, flush=True)
            old = new
    from rich.console import Console
    from rich.live import Live
    with Live(rich_view(figures(old, None, ref)), console=Console(file=out), screen=False,
              auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            new = sample(conn, url)
            live.update(rich_view(figures(new, old, ref)), refresh=True)
            old = new
