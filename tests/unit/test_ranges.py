"""Page indices -> runs and byte ranges."""
import numpy as np
import pytest

from uffdsrv.core.ranges import PAGE, byte_ranges, paired_runs, runs


@pytest.mark.parametrize("idx, first, count", [
    ([], [], []),
    ([7], [7], [1]),
    ([0, 1, 2, 3], [0], [4]),
    ([0, 2, 4], [0, 2, 4], [1, 1, 1]),
    ([1, 2, 3, 7, 8, 20], [1, 7, 20], [3, 2, 1]),
    ([5, 9, 10, 11], [5, 9], [1, 3]),
])
def test_runs(idx, first, count):
    f, c = runs(np.array(idx, dtype=np.int64))
    assert f.tolist() == first
    assert c.tolist() == count
    assert int(c.sum()) == len(idx)


def test_runs_accepts_lists():
    f, c = runs([3, 4])
    assert (f.tolist(), c.tolist()) == ([3], [2])


@pytest.mark.parametrize("a, b, pos, count", [
    ([], [], [], []),
    ([4], [9], [0], [1]),
    ([0, 1, 2], [5, 6, 7], [0], [3]),
    # a breaks (gap in the buffer) and b breaks (slots not adjacent)
    ([0, 1, 2, 5, 6], [10, 11, 13, 14, 15], [0, 2, 3], [2, 1, 2]),
    ([0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3], [1, 1, 1, 1]),
])
def test_paired_runs(a, b, pos, count):
    p, c = paired_runs(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
    assert p.tolist() == pos
    assert c.tolist() == count


@pytest.mark.parametrize("base, idx, starts, lengths", [
    (0x10000, [], [], []),
    (0x10000, [0], [0x10000], [PAGE]),
    (0x10000, [0, 1, 2], [0x10000], [3 * PAGE]),
    (0x7F0000000000, [1, 2, 5], [0x7F0000001000, 0x7F0000005000], [2 * PAGE, PAGE]),
])
def test_byte_ranges(base, idx, starts, lengths):
    s, n = byte_ranges(base, np.array(idx, dtype=np.int64))
    assert s.dtype == np.uint64 and n.dtype == np.uint64
    assert s.tolist() == starts
    assert n.tolist() == lengths
