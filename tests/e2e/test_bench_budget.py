"""The showdown bench end to end: `python -m bench budget --quick` on the real
kernel (a memory cgroup with swap, zswap, the server with and without its
RAM tier, on policyload's Zipf accesses and on redis), then every row is
checked for its shape and for being what it says: held at its budget (a
contender that ran unlimited, or whose memory grew far past the budget,
fails), faulting where it was limited, reading back the same data in the
same order, the kernel left as it was found. The figures themselves are not
asserted (how they compare is what bench/RESULTS.md reports)."""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import PY, ROOT, kernel_missing

MEMCG = Path("/sys/fs/cgroup/memory")
ZSWAP = Path("/sys/module/zswap/parameters")
WORKLOADS = ("zipf", "redis")
BUDGETS = (0.25, 0.5)
METHODS = ("none", "kernel-swap", "kernel-zswap", "uffdsrv-disk", "uffdsrv-tiered")
KEYS = {"bench", "workload", "budget", "method", "ops_per_s", "p99_us", "major_faults",
        "memory_bytes", "compression_ratio", "extra"}
MIB = 1 << 20
TIMEOUT = 110  # seconds; the run itself prints how long it took


def _swap_in_use() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().splitlines()) > 1


def _zswap() -> dict:
    return {f.name: f.read_text() for f in ZSWAP.iterdir()} if ZSWAP.exists() else {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    why = kernel_missing()
    if why:
        pytest.skip(why)
    if _swap_in_use():
        pytest.skip("swap is already enabled: the kernel rows need to own it")
    if not (MEMCG / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller: the kernel rows need it")
    if not (ZSWAP / "enabled").exists():
        pytest.skip("the kernel has no zswap")
    if not (ROOT / "uffdsrv" / "_bin" / "policyload").exists():
        pytest.skip("policyload is not built (make setup)")
    out = tmp_path_factory.mktemp("bench") / "budget.json"
    groups = set(os.listdir(MEMCG))
    zswap = _zswap()
    debugfs = os.path.ismount("/sys/kernel/debug")
    # ~40 s on a quiet machine. On a timeout the bench gets SIGTERM, not
    # SIGKILL: it must swapoff, restore zswap and stop its programs itself.
    p = subprocess.Popen([PY, "-m", "bench", "budget", "--quick", "--json", str(out)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = p.communicate(timeout=TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        p.terminate()
        err = p.communicate(timeout=60)[1]
        pytest.fail(f"bench budget --quick took over {TIMEOUT} s: {err[-2000:]}")
    assert p.returncode == 0, err[-4000:]
    assert not _swap_in_use(), "the benchmark left swap enabled"
    left = {g for g in set(os.listdir(MEMCG)) - groups if g.startswith("uffdsrv-bench-")}
    assert not left, f"the benchmark left memory cgroups behind: {left}"
    assert _zswap() == zswap, "the benchmark did not restore zswap's parameters"
    assert os.path.ismount("/sys/kernel/debug") == debugfs, "debugfs mount state changed"
    return json.loads(out.read_text())


def _tier_available() -> bool:
    r = subprocess.run([PY, "-m", "uffdsrv", "serve", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    return "--ram-tier" in r.stdout


def _measured(rows):
    return [r for r in rows if not r["extra"].get("skipped") and not r["extra"].get("failed")]


def _pos(row, *fields):
    for f in fields:
        v = row[f]
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, (f, row)


def test_every_row_exactly_once_with_its_keys(results):
    rows = results["rows"]
    got = sorted((r["workload"], r["budget"], r["method"]) for r in rows)
    assert got == sorted((w, b, m) for w in WORKLOADS for b in BUDGETS for m in METHODS)
    for r in rows:
        assert set(r) == KEYS and r["bench"] == "budget", r
        assert isinstance(r["extra"], dict), r


def test_skips_and_failures_say_why(results):
    for r in results["rows"]:
        e = r["extra"]
        if e.get("skipped"):
            assert r["ops_per_s"] is None and isinstance(e["skipped"], str), r
            assert any(e["skipped"] in s for s in results["meta"]["skipped"]), r
        elif e.get("failed"):
            # the ways a row may fail: the kernel's OOM killer at the limit,
            # or a limit the kernel could not reclaim the group down to
            assert r["method"].startswith("kernel-"), r
            assert "OOM" in e["failed"] or "could not reclaim" in e["failed"], r
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        assert not [r for r in results["rows"]
                    if r["workload"] == "redis" and r["extra"].get("skipped")]
    tiered = [r for r in results["rows"] if r["method"] == "uffdsrv-tiered"]
    if _tier_available():
        assert not [r for r in tiered if r["extra"].get("skipped")], tiered
    else:
        assert all("--ram-tier" in r["extra"].get("skipped", "") for r in tiered), tiered
    assert len(_measured(results["rows"])) >= 8


def test_rows_sane(results):
    for r in _measured(results["rows"]):
        _pos(r, "ops_per_s", "p99_us", "memory_bytes")
        assert isinstance(r["major_faults"], int) and r["major_faults"] >= 0, r
        e = r["extra"]
        assert e["budget_bytes"] == int(e["budget_bytes"]) > 0, r
        if r["method"] == "none":
            assert r["major_faults"] <= 10, r  # all of it resident
            assert r["memory_bytes"] >= 0.8 * e["footprint_bytes"], r
            assert r["compression_ratio"] is None, r
            continue
        # held below its footprint, it must fault, and its relative figure
        # is over the same run's `none`
        assert r["major_faults"] > 0, r
        none = next(x for x in results["rows"] if x["method"] == "none"
                    and x["workload"] == r["workload"] and x["budget"] == r["budget"])
        assert math.isclose(e["relative"], r["ops_per_s"] / none["ops_per_s"]), r
        assert e["budget_bytes"] == int(none["extra"]["footprint_bytes"] * r["budget"]), r


def test_held_at_the_budget(results):
    """A contender whose program grew far past the budget (or was never
    limited) fails here. The server enforces after the fact, so its program
    gets some slack; the kernel charges every page before it is mapped."""
    for r in _measured(results["rows"]):
        e, b = r["extra"], r["extra"]["budget_bytes"]
        if r["method"] == "kernel-swap":
            assert r["memory_bytes"] <= 1.1 * b, r
        elif r["method"] == "kernel-zswap":
            pool = e["zswap"].get("pool_total_size", 0)
            assert r["memory_bytes"] <= 1.1 * b + pool, r
            assert r["memory_bytes"] >= pool, r  # the pool is counted in
        elif r["method"].startswith("uffdsrv"):
            assert e["program_budget_bytes"] + e["pool_cap_bytes"] <= b, r
            # its memory cgroup's usage, as the kernel rows are held (its RSS
            # also counts file pages charged elsewhere: the binary, libc)
            assert e["program_cgroup_usage_bytes"] <= 1.3 * b + 2 * MIB, r
            assert r["memory_bytes"] >= e["program_rss_bytes"] + e["server_rss_idle_bytes"] // 2
        if r["method"] == "uffdsrv-tiered":
            t = e["tier"]
            assert t["pool_bytes"] <= 1.1 * e["pool_cap_bytes"] + MIB, r
            assert t["hits"] > 0 and t["stored_pages"] > 0, r


def test_compression_ratios(results):
    """zswap's and the pool's ratio on the same data; the Zipf pages are
    filled like a heap: they compress, but nothing like zeros would."""
    for r in _measured(results["rows"]):
        if r["method"] in ("kernel-zswap", "uffdsrv-tiered"):
            _pos(r, "compression_ratio")
            assert 1.3 <= r["compression_ratio"] <= 5, r
        else:
            assert r["compression_ratio"] is None, r
        if r["method"] == "kernel-zswap":
            assert r["extra"]["zswap_compressor"] == "lzo-rle", r


def test_same_data_same_sequence(results):
    zipf = _measured([r for r in results["rows"] if r["workload"] == "zipf"])
    assert len({r["extra"]["checksum"] for r in zipf}) == 1, zipf  # same bytes, same order
    assert len({r["extra"]["accesses"] for r in zipf}) == 1, zipf
    for r in _measured([r for r in results["rows"] if r["workload"] == "redis"]):
        # every GET found its key: the dataset and redis-benchmark's keys agree
        assert r["extra"]["hits"] == r["extra"]["requests"] and r["extra"]["misses"] == 0, r


def test_targets_and_plot(results):
    names = {t["name"]: t for t in results["ratios"]}
    for name in ("budget zipf 25%: ops/s, uffdsrv-disk / kernel-swap",
                 "budget redis 50%: GET/s, best uffdsrv / best kernel",
                 "budget zipf 25%: memory in use, uffdsrv-disk / kernel-swap"):
        t = names[name]
        assert t["met"] in (True, False) and t["value"] > 0, t
    out = ROOT / "bench" / "results"
    assert (out / "budget.png").stat().st_size > 0
    assert "### budget" in (out / "results.md").read_text()
