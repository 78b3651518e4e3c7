"""core/sparse.py: present extents of a huge mapping -> the chunks managed."""
import random

import pytest

from uffdsrv.core import sparse

MIB = 1 << 20
C = sparse.CHUNK
BASE = 1 << 40          # chunk-aligned
END = BASE + (16 << 30)


def covers(chunks, extents, start=BASE, end=END):
    """Every byte of every extent (clipped to the mapping) is in a chunk."""
    for s, e in extents:
        s, e = max(s, start), min(e, end)
        if s >= e:
            continue
        if not any(cs <= s and e <= ce for cs, ce in chunks):
            return False
    return True


def well_formed(chunks, start=BASE, end=END, align=C):
    for (s, e), nxt in zip(chunks, chunks[1:] + [None]):
        assert start <= s < e <= end
        assert s % align == 0 or s == start
        assert e % align == 0 or e == end
        if nxt is not None:
            assert e < nxt[0], "touching chunks are not merged"


CASES = [
    # (extents, expected chunks)
    ([], []),
    ([(BASE + 4096, BASE + 8192)], [(BASE, BASE + C)]),
    # one page on each side of a chunk boundary: two chunks, merged (touching)
    ([(BASE + C - 4096, BASE + C + 4096)], [(BASE, BASE + 2 * C)]),
    # two extents in one chunk, given out of order
    ([(BASE + MIB, BASE + MIB + 4096), (BASE + 4096, BASE + 8192)], [(BASE, BASE + C)]),
    # a gap of one empty chunk stays a gap
    ([(BASE, BASE + 4096), (BASE + 2 * C, BASE + 2 * C + 4096)],
     [(BASE, BASE + C), (BASE + 2 * C, BASE + 3 * C)]),
    # overlapping extents
    ([(BASE, BASE + 3 * C), (BASE + C, BASE + C + 4096)], [(BASE, BASE + 3 * C)]),
    # outside the mapping: dropped
    ([(BASE - C, BASE), (END, END + 4096)], []),
]


@pytest.mark.parametrize("extents,want", CASES)
def test_extents_round_out_to_aligned_merged_chunks(extents, want):
    assert sparse.chunks(extents, BASE, END) == want


def test_an_unaligned_mapping_is_clipped_at_its_bounds():
    start, end = BASE + 4096 * 3, BASE + 5 * C + 4096 * 7
    got = sparse.chunks([(start, start + 4096), (end - 4096, end)], start, end)
    assert got == [(start, BASE + C), (BASE + 5 * C, end)]
    well_formed(got, start, end)


def test_the_cap_merges_the_closest_chunks_first():
    # chunks at 0, 1 (touching: one), 3, 10, 11 (one), 30: gaps of 1, 6, 18 chunks
    at = [0, 1, 3, 10, 11, 30]
    ext = [(BASE + i * C + 4096, BASE + i * C + 8192) for i in at]
    assert len(sparse.chunks(ext, BASE, END)) == 4
    assert sparse.chunks(ext, BASE, END, cap=3) == [
        (BASE, BASE + 4 * C), (BASE + 10 * C, BASE + 12 * C), (BASE + 30 * C, BASE + 31 * C)]
    assert sparse.chunks(ext, BASE, END, cap=2) == [
        (BASE, BASE + 12 * C), (BASE + 30 * C, BASE + 31 * C)]
    assert sparse.chunks(ext, BASE, END, cap=1) == [(BASE, BASE + 31 * C)]
    with pytest.raises(ValueError):
        sparse.chunks(ext, BASE, END, cap=0)


@pytest.mark.parametrize("seed", range(20))
def test_random_extents_are_all_covered_within_the_cap(seed):
    rnd = random.Random(seed)
    ext = []
    for _ in range(rnd.randrange(1, 2000)):
        s = BASE + rnd.randrange(0, 16 << 30, 4096)
        ext.append((s, min(s + 4096 * rnd.randrange(1, 600), END)))
    cap = rnd.choice([1, 7, 64, 256])
    got = sparse.chunks(ext, BASE, END, cap=cap)
    assert 1 <= len(got) <= cap
    well_formed(got)
    assert covers(got, ext)
    # no chunk starts or ends on memory that holds nothing: its first and
    # last 2 MiB each hold a present byte
    def holds(lo, hi):
        return any(es < hi and lo < ee for es, ee in ext)
    for s, e in got:
        assert holds(s, min(s + C, e)) and holds(max(e - C, s), e), (s, e)
    # without a cap in the way, no chunk is wider than the extents need
    if cap == 256 and len(got) < 256:
        total = sum(e - s for s, e in got)
        assert total <= sum(((ee - 1) // C - es // C + 1) * C for es, ee in ext)


def test_runs_join_the_pieces_of_a_split_mapping():
    pieces = [(BASE + 2 * C, BASE + 3 * C), (BASE, BASE + C), (BASE + C, BASE + 2 * C),
              (BASE + 5 * C, BASE + 6 * C)]
    assert sparse.runs(pieces) == [(BASE, BASE + 3 * C), (BASE + 5 * C, BASE + 6 * C)]
    assert sparse.runs([]) == []
