"""`uffdsrv top`'s figures (uffdsrv/top.py): memory given back is the
machine's MemFree against the reference sample, beside the managed
programs' resident bytes and the page cache's growth."""
import io

from uffdsrv import top
from uffdsrv.core import protocol as p

from .test_ctl import FakeServer

MIB = 1 << 20


def status(*resident):
    return {"clients": [{"pid": 10 + i, "comm": "w", "managed_bytes": 64 * MIB,
                         "resident_bytes": r, "swapped_bytes": 64 * MIB - r,
                         "faults_total": 5} for i, r in enumerate(resident)],
            "swap": {"path": "/swap", "used_bytes": 0, "size_bytes": 256 * MIB}}


def sample(at, resident, memfree, cached):
    return top.Sample(at, status(*resident), {}, {"MemFree": memfree, "Cached": cached})


def test_memory_counts_from_the_reference_sample():
    ref = sample(0, (64 * MIB, 32 * MIB), 1000 * MIB, 300 * MIB)
    old = sample(1, (10 * MIB, 32 * MIB), 1040 * MIB, 310 * MIB)
    new = sample(2, (0, 16 * MIB), 1070 * MIB, 320 * MIB)
    m = top.figures(new, old, ref)["memory"]
    assert m == {"memfree_bytes": 1070 * MIB, "memfree_gained_bytes": 70 * MIB,
                 "page_cache_growth_bytes": 20 * MIB, "resident_bytes": 16 * MIB,
                 "resident_change_bytes": -80 * MIB}
    # without a reference, from the older sample
    assert top.figures(new, old)["memory"]["memfree_gained_bytes"] == 30 * MIB
    line = next(x for x in top.summary_lines(top.figures(new, old, ref))
                if x.startswith("memory:"))
    assert "given back +70.0 MiB" in line and "page cache +20.0 MiB" in line
    assert "managed resident 16.0 MiB (-80.0 MiB)" in line


def test_memory_unknown_is_a_dash():
    new = top.Sample(1, status(0), {}, {})
    m = top.figures(new, None)["memory"]
    assert m["memfree_gained_bytes"] is None and m["resident_change_bytes"] is None
    line = next(x for x in top.summary_lines(top.figures(new, None)) if x.startswith("memory:"))
    assert "given back -" in line


def test_once_polls_one_kept_connection(tmp_path):
    s = FakeServer(str(tmp_path / "s.sock"),
                   lambda seq, req: [p.pack_ctl(p.CTL_REPLY, seq, status(3 * MIB))])
    try:
        out = io.StringIO()
        assert top.run(s.path, None, 0.01, True, out) == 0
    finally:
        s.close()
    text = out.getvalue()
    assert "memory: MemFree" in text and "since start" in text and "10" in text
    assert s.accepted == 1 and len(s.requests) == 2
