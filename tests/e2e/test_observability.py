"""Observability end to end: a real server with --metrics-addr, a workload
that is filled, reclaimed and faulted back in, and a real Prometheus
scraping the server every second on loopback. Every PromQL expression of
every panel of every dashboard under grafana/dashboards must return data
through Prometheus' HTTP API; promtool must accept the shipped config and
find nothing to complain about in /metrics; `uffdsrv top --once` shows the
same figures; a client's series vanish when it exits. The server runs a
RAM tier capped below what a second, compressible program needs, so the
pool's series (stored pages, ratio, evictions, hits) have real values."""
import json
import os
import pty
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from ..conftest import PY, ROOT, Server, Workload, kernel_missing, uffdsrv, wait_client
from ..support import wait_until
from .test_ram_tier import PROGRAM, Program

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_YML = ROOT / "examples" / "prometheus.yml"
RATE_INTERVAL = "10s"  # what Grafana would pick for a 1 s scrape interval, give or take
TIER_CAP = 3 << 20  # the slot index of a 256M swap file and ~1.4 MiB of pool: it fills


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def missing_tools() -> str | None:
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package prometheus; make test installs it)"
    return None


def panels(dashboard: dict):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def panel_exprs(dashboard: dict):
    for p in panels(dashboard):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p.get("title", "?"), t["expr"]


def substitute(expr: str, dashboard: dict) -> str:
    """Template variables as Grafana would fill them: every query variable
    at its `All` value, $__rate_interval for a 1 s scrape interval."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for v in dashboard.get("templating", {}).get("list", []):
        if v["type"] == "query":
            value = v.get("allValue") or ".*"
            out = out.replace("${" + v["name"] + "}", value).replace("$" + v["name"], value)
    left = re.findall(r"\$\{?\w+", out)
    assert not left, f"unresolved template variables {left} in {expr}"
    return out


class Prometheus:
    def __init__(self, tmp, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       "scrape_configs:\n  - job_name: uffdsrv\n    static_configs:\n"
                       f"      - targets: ['{target}']\n")
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> dict:
        q = urllib.parse.urlencode({"query": expr})
        try:
            return json.loads(get(f"{self.url}/api/v1/query?{q}"))
        except urllib.error.HTTPError as e:  # 400/422: a bad expression, with a reason
            return json.loads(e.read().decode() or '{"status": "error"}')

    def value(self, expr: str) -> float | None:
        r = self.query(expr)
        if r.get("status") != "success" or not r["data"]["result"]:
            return None
        return float(r["data"]["result"][0]["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cycles(threading.Thread):
    """Rewrite, reclaim and read back the workload, again and again, so
    that every rate window has reclaim, swap-ins and faults in it."""

    def __init__(self, server: Server, w: Workload, t: Program):
        super().__init__(daemon=True)
        self.server, self.w, self.t = server, w, t
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self):
        gen = 2
        try:
            while not self.stop.is_set():
                assert self.w.cmd(f"write {gen} 2") == "ok"
                self.server.reclaim(self.w.pid)
                assert self.w.verify() == (self.w.npages, 0)
                # the compressible program stays reclaimed between rounds, in
                # the pool (what it cannot hold is evicted) and on disk
                assert self.t.verify() == (self.t.npages, 0)
                self.t.cmd(f"fill text {gen}")
                self.server.reclaim(self.t.pid)
                gen += 1
                self.rounds += 1
                self.stop.wait(0.2)
        except BaseException as e:  # reported by the test that stops us
            self.error = e

    def finish(self):
        self.stop.set()
        self.join(60)
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    why = kernel_missing() or missing_tools()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("observability")
    mport = free_port()
    s = Server(tmp, swap_size="256M", extra=["--metrics-addr", f"127.0.0.1:{mport}",
                                             "--ram-tier", str(TIER_CAP)]).start()
    w = t = prom = cycles = None
    try:
        w = Workload(s.socket, mib=32, threads=2)
        wait_client(s, w.pid)
        assert w.cmd("fill 1") == "ok"
        assert s.reclaim(w.pid) >= 30 << 20
        assert w.verify() == (w.npages, 0)
        (tmp / "tier_program.py").write_text(PROGRAM)
        t = Program(s, tmp / "tier_program.py")
        t.cmd("fill text 1")
        s.reclaim(t.pid)
        prom = Prometheus(tmp, f"127.0.0.1:{mport}")
        cycles = Cycles(s, w, t)
        cycles.start()
        yield {"server": s, "workload": w, "prometheus": prom, "cycles": cycles,
               "metrics_url": f"http://127.0.0.1:{mport}/metrics"}
        cycles.finish()
    finally:
        if cycles is not None:
            cycles.stop.set()
            cycles.join(60)
        if prom is not None:
            prom.stop()
        if w is not None:
            w.close()
        if t is not None:
            t.close()
        code = s.stop()
        log = s.log_text()
        assert "Traceback" not in log, log
        assert code == 0, log


def wait_for_samples(prom: Prometheus, seconds: float = 30) -> None:
    """Until Prometheus has scraped the server for a few seconds while the
    workload was reclaimed and faulted back in within the rate window."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        if prom.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {prom.log.read_text()[-3000:]}")
        try:
            ready = (prom.value('up{job="uffdsrv"}') == 1
                     and (prom.value('count_over_time(up{job="uffdsrv"}[1m])') or 0) >= 8
                     and (prom.value(f"rate(uffdsrv_reclaimed_pages_total[{RATE_INTERVAL}])")
                          or 0) > 0
                     and (prom.value(f"rate(uffdsrv_swapped_in_pages_total[{RATE_INTERVAL}])")
                          or 0) > 0)
        except (urllib.error.URLError, OSError) as e:  # not listening yet
            last, ready = e, False
        if ready:
            return
        time.sleep(0.5)
    raise AssertionError(f"prometheus never had samples ({last}): "
                         f"{prom.log.read_text()[-3000:]}")


def test_dashboards_exist_with_fixed_uid_and_datasource_variable():
    assert DASHBOARDS, "no dashboards under grafana/dashboards"
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d.get("uid"), f"{path.name}: no fixed uid"
        assert "__inputs" not in d and "${DS_" not in path.read_text(), \
            f"{path.name}: ${{DS_...}} inputs break file provisioning"
        names = {v["name"]: v for v in d["templating"]["list"]}
        assert names.get("datasource", {}).get("type") == "datasource", path.name
        for p in panels(d):
            if p.get("type") == "row":
                continue
            assert p.get("datasource", {}).get("uid") == "${datasource}", p.get("title")
            assert p.get("targets"), f"panel {p.get('title')!r} has no query"
            for t in p["targets"]:
                assert t.get("datasource", {}).get("uid") == "${datasource}", p.get("title")
        for _title, expr in panel_exprs(d):
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, expr


def test_provisioning_points_at_the_dashboards():
    prov = ROOT / "grafana" / "provisioning"
    ds = (prov / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^apiVersion: 1$", ds, re.M)
    assert re.search(r"^\s+type: prometheus$", ds, re.M)
    assert re.search(r"^\s+uid: \S+", ds, re.M)
    dash = (prov / "dashboards" / "uffdsrv.yml").read_text()
    assert re.search(r"^apiVersion: 1$", dash, re.M)
    assert re.search(r"^\s+type: file$", dash, re.M)
    assert re.search(r"^\s+path: \S+", dash, re.M)


def test_promtool_accepts_shipped_config():
    if missing_tools():
        pytest.skip(missing_tools())
    r = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_metrics_is_silent(observed):
    text = get(observed["metrics_url"])
    assert "uffdsrv_client_resident_bytes{" in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, out


def test_metrics_cover_every_figure(observed):
    text = get(observed["metrics_url"])
    pid = observed["workload"].pid
    for name in ("uffdsrv_faults_total", "uffdsrv_fault_duration_seconds_bucket",
                 "uffdsrv_reclaimed_pages_total", "uffdsrv_swapped_in_pages_total",
                 "uffdsrv_swap_written_bytes_total", "uffdsrv_swap_read_bytes_total",
                 "uffdsrv_reclaim_batch_duration_seconds_bucket", "uffdsrv_managed_bytes",
                 "uffdsrv_resident_bytes", "uffdsrv_swapped_bytes", "uffdsrv_swap_size_bytes",
                 "uffdsrv_swap_used_bytes", "uffdsrv_zap_calls_total", "uffdsrv_zap_ranges_total",
                 "uffdsrv_zap_ranges_per_call_bucket", "uffdsrv_tlb_shootdowns_total",
                 "uffdsrv_ring_submissions_total", "uffdsrv_ring_entries_submitted_total",
                 "uffdsrv_uffd_events_total", "uffdsrv_errors_total", "uffdsrv_clients",
                 "uffdsrv_build_info", "uffdsrv_swapped_pages", "uffdsrv_memory_saved_bytes",
                 "uffdsrv_ram_tier_cap_bytes", "uffdsrv_ram_tier_pool_bytes",
                 "uffdsrv_ram_tier_stored_bytes", "uffdsrv_ram_tier_compression_ratio",
                 "uffdsrv_ram_tier_same_filled_pages", "uffdsrv_ram_tier_rejected_pages_total",
                 "uffdsrv_ram_tier_evicted_pages_total", "uffdsrv_ram_tier_dropped_pages_total",
                 "uffdsrv_ram_tier_lookups_total", "uffdsrv_ram_tier_hit_seconds_total"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} is not exposed"
    m = re.search(r'^uffdsrv_faults_total{kind="swap"} (\S+)', text, re.M)
    assert m and float(m[1]) > 0, "no swap-in faults counted"
    for k in ("managed", "resident", "swapped"):
        assert re.search(rf'^uffdsrv_client_{k}_bytes{{.*pid="{pid}"', text, re.M), k


def test_top_once_shows_the_same_figures(observed):
    s, w = observed["server"], observed["workload"]
    r = uffdsrv("top", "--socket", s.socket, "--metrics-url", observed["metrics_url"],
                "--interval", "0.5", "--once", timeout=60)
    out = r.stdout
    assert "\x1b[" not in out, "escape codes on a pipe"
    row = re.search(rf"^\s*{w.pid}\s+(\S+)\s+.*MiB\s+([\d,]+)\s+\S+$", out, re.M)
    assert row and int(row[2].replace(",", "")) > 0, out
    for needle in ("swap:", "faults/s:", "fault time:", "reclaim:", "zap:", "ring:", "errors:"):
        assert needle in out, out
    # the pool may be empty at this moment (a round just faulted it all in);
    # what the random workload had refused is counted for good
    tier = re.search(r"^ram tier: [\d.,]+ MiB of 3\.0 MiB \(lz4\), [\d,]+ pages \([\d,]+ "
                     r"same-filled\), ratio ([\d.]+|-) .* rejected ([\d,]+)  saved net of the pool "
                     r"-?[\d.,]+ MiB$", out, re.M)
    assert tier and int(tier[2].replace(",", "")) >= w.npages, out
    # on a terminal: drawn with rich
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([PY, "-m", "uffdsrv", "top", "--socket", s.socket, "--metrics-url",
                              observed["metrics_url"], "--interval", "0.2", "--once"],
                             stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
                             env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
        os.close(slave)
        slave = None
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    shown = b"".join(chunks).decode(errors="replace")
    assert str(w.pid) in shown and "ranges/call" in shown and "\x1b[" in shown, shown
    # without /metrics: the control socket's figures only, and a hint
    r = uffdsrv("top", "--socket", s.socket, "--interval", "0.1", "--once", timeout=60)
    assert str(w.pid) in r.stdout and "--metrics-url" in r.stdout, r.stdout


def test_top_mistakes_get_one_line(observed):
    s = observed["server"]
    for args, needle in ((["--socket", "/nonexistent/sock"], "no uffdsrv server"),
                         (["--socket", s.socket, "--metrics-url", "127.0.0.1:1"],
                          "cannot read metrics"),
                         (["--socket", s.socket, "--interval", "0"], "positive")):
        r = uffdsrv("top", *args, "--once", check=False, timeout=60)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ram_tier_figures_reach_prometheus(observed):
    """What the RAM tier panels show is real: the pool held pages at a
    ratio above 1, never above its cap, filled up and evicted, and served
    fault-ins (with their own service time) while the rest came from disk."""
    prom = observed["prometheus"]
    wait_for_samples(prom)
    window = "[1m]"

    def value(expr):
        return wait_until(lambda: prom.value(expr), timeout=30, message=expr)
    assert value(f'max_over_time(uffdsrv_swapped_pages{{tier="ram"}}{window})') > 0
    assert value(f'max_over_time(uffdsrv_swapped_pages{{tier="disk"}}{window})') > 0
    assert value(f"max_over_time(uffdsrv_ram_tier_compression_ratio{window})") > 1
    assert value(f"max_over_time(uffdsrv_ram_tier_pool_bytes{window})") <= TIER_CAP
    for expr in (f"increase(uffdsrv_ram_tier_evicted_pages_total{window})",
                 f"increase(uffdsrv_ram_tier_rejected_pages_total{window})",  # the random one
                 f'increase(uffdsrv_ram_tier_lookups_total{{result="hit"}}{window})',
                 f'increase(uffdsrv_ram_tier_lookups_total{{result="miss"}}{window})',
                 f'increase(uffdsrv_fault_duration_seconds_count{{kind="tier"}}{window})'):
        assert value(expr) > 0, expr
    # one scrape reads the pool and the slots a moment apart: a batch of
    # fault-ins may fall in between
    off = prom.value("abs(uffdsrv_memory_saved_bytes + on() uffdsrv_ram_tier_pool_bytes "
                     "- on() uffdsrv_swap_used_bytes)")
    assert off is not None and off <= 256 * 4096, "memory saved is not swap in use less the pool"


def test_every_dashboard_query_returns_data(observed):
    prom = observed["prometheus"]
    wait_for_samples(prom)
    failures, n = [], 0
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for v in d["templating"]["list"]:  # the variables' own queries must list something
            if v["type"] == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                assert m, f"{path.name}: variable {v['name']}: cannot check {q!r}"
                r = prom.query(f"count by ({m[2]}) ({substitute(m[1], d)})")
                if r.get("status") != "success" or not r["data"]["result"]:
                    failures.append(f"{path.name}: variable ${v['name']}: {q}: {r}")
        for title, expr in panel_exprs(d):
            n += 1
            r = prom.query(substitute(expr, d))
            if r.get("status") != "success":
                failures.append(f"{path.name}: panel {title!r}: {expr}: "
                                f"{r.get('errorType')}: {r.get('error')}")
            elif not r["data"]["result"]:
                failures.append(f"{path.name}: panel {title!r}: no data: {expr}")
    assert n >= 20, f"only {n} panel queries found"
    assert not failures, "\n".join(failures)
    observed["cycles"].finish()  # the workload kept reclaiming and verifying meanwhile
    assert observed["cycles"].rounds >= 2


def test_client_series_vanish_when_it_exits(observed):
    s = observed["server"]
    w = Workload(s.socket, mib=8, threads=1, seed=7)
    try:
        wait_client(s, w.pid)
        assert w.cmd("fill 1") == "ok"
        assert f'pid="{w.pid}"' in get(observed["metrics_url"])
    finally:
        w.close()
    wait_until(lambda: f'pid="{w.pid}"' not in get(observed["metrics_url"]),
               message="the exited client's series are still exposed", interval=0.1)
