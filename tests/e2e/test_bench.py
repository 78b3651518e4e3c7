"""The benchmark harness end to end: `python -m bench all --quick` on the real
kernel, then every row, method and field the README promises is checked for
presence and sanity, and the target ratios for having been computed. The
figures themselves are not asserted: absolute times on shared machines are
noise; bench/RESULTS.md reports them."""
import json
import math
import os
import subprocess

import pytest

from ..conftest import PY, ROOT, kernel_missing


def _swap_in_use() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    why = kernel_missing()
    if why:
        pytest.skip(why)
    if _swap_in_use():
        pytest.skip("swap is already enabled: the kernel-swap comparison needs to own it")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run([PY, "-m", "bench", "all", "--quick", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not _swap_in_use(), "the benchmark left swap enabled"
    return json.loads(out.read_text())


def _finite_pos(row, *fields):
    for f in fields:
        v = row.get(f)
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, (f, row)


def _finite_nonneg(row, *fields):
    for f in fields:
        v = row.get(f)
        assert isinstance(v, int | float) and math.isfinite(v) and v >= 0, (f, row)


def test_every_row_has_bench_method_threads(results):
    for row in results["rows"]:
        assert row["bench"] in ("zap", "reclaim", "fault", "policy"), row
        assert isinstance(row["method"], str) and isinstance(row["threads"], int), row


def test_zap_rows(results):
    rows = [r for r in results["rows"] if r["bench"] == "zap"]
    busy = {0, 1} if (os.cpu_count() or 1) > 1 else {0}
    for memory in ("anon", "uffd", "uffd+remove"):
        for b in busy:
            got = {(r["method"], r["vlen"]) for r in rows
                   if r["memory"] == memory and r["threads"] == b}
            want = {("madvise", 1)} | {("process_madvise", v) for v in (1, 8, 64, 256, 1024)}
            assert want <= got, (memory, b, want - got)
    for r in rows:
        _finite_pos(r, "us_per_range")
        _finite_nonneg(r, "tlb_per_range", "tlb_per_call")


def test_reclaim_rows(results):
    rows = [r for r in results["rows"] if r["bench"] == "reclaim"]
    assert {r["method"] for r in rows} >= {"process_madvise", "madvise", "pageout"}
    for r in rows:
        _finite_pos(r, "pages_per_s", "cpu_s_per_gib")
        _finite_nonneg(r, "tlb_per_page")
        assert r["pages"] > 0, r


def test_fault_rows(results):
    rows = [r for r in results["rows"] if r["bench"] == "fault"]
    for method in ("uffdsrv", "c-reference", "kernel-swap"):
        for pattern in ("seq", "random"):
            for threads in (1, 4):
                got = [r for r in rows if (r["method"], r["pattern"], r["threads"])
                       == (method, pattern, threads)]
                assert got, (method, pattern, threads)
                for r in got:
                    _finite_pos(r, "pages_per_s", "p50_us", "p99_us")
                    assert r["p99_us"] >= r["p50_us"], r
                    assert r["bad_pages"] == 0, r


def test_policy_rows(results):
    """The policy benchmark is part of `all`; tests/e2e/test_bench_policy.py
    checks its rows in detail."""
    got = {(r["method"], r["pattern"]) for r in results["rows"] if r["bench"] == "policy"}
    assert got == {(m, p) for m in ("coldest", "fifo", "random") for p in ("zipf", "seq")}, got


def test_target_ratios_computed(results):
    targets = [r for r in results["ratios"] if r["op"]]
    names = " ".join(r["name"] for r in targets)
    for part in ("zap anon", "TLB per page, coalesced", "MADV_PAGEOUT",
                 "fault random, 1 thr: pages/s, uffdsrv / c-reference",
                 "fault random, 1 thr: p99", "fault seq, 1 thr: pages/s, uffdsrv / kernel-swap",
                 "policy zipf: refaults per 1000 accesses, coldest / fifo",
                 "policy seq: pages per fault from swap, coldest"):
        assert part in names, part
    for r in targets:
        v = r["value"]
        assert isinstance(v, int | float) and math.isfinite(v) and v >= 0, r
        assert r["met"] in (True, False), r


def test_results_written(results):
    out = ROOT / "bench" / "results"
    for name in ("results.json", "results.md", "zap.png", "reclaim.png", "fault.png",
                 "policy.png"):
        assert (out / name).stat().st_size > 0, name
