"""Sparse mappings: manage only the parts that hold data.

A NORESERVE mapping of 16 GiB with a few MiB used would cost a page map
of 4M pages (~80 MB at ~19 bytes a page) and a pagemap read of every
page, though almost none of it is memory. Where the kernel has
PAGEMAP_SCAN (6.7+), the server asks it for the present extents only,
rounds them out to CHUNK-aligned chunks (a 2 MiB chunk costs ~10 KB of
page map, a page touched next to a present one is likely in the same
chunk, and a VMA split on a 2 MiB boundary splits no transparent huge
page), merges neighbours, and manages just those chunks.

Registering a sub-range splits the VMA in two or three: each chunk costs
up to two VMAs against the process's vm.max_map_count (65530 by default),
so a mapping gets at most MAX_CHUNKS chunks; past that the closest chunks
are merged first, which closes the smallest gaps and so adds the fewest
never-present pages to the page map.

Pure: extents in, chunks out.
"""
import numpy as np

CHUNK = 2 << 20
MAX_CHUNKS = 256
SPARSE_BYTES = 1 << 30   # mappings larger than this are managed in chunks


def chunks(extents, start: int, end: int, chunk: int = CHUNK,
           cap: int = MAX_CHUNKS) -> list[tuple[int, int]]:
    """Sorted, disjoint (s, e) chunks of [start, end) covering every byte of
    `extents` (an iterable of (s, e), any order, overlaps allowed) that lies
    inside it: each extent rounded out to `chunk` alignment (clipped to the
    mapping), touching or overlapping chunks merged, then the smallest gaps
    closed until at most `cap` remain."""
    if cap < 1:
        raise ValueError("cap must be at least 1")
    a = np.asarray(list(extents) if not isinstance(extents, np.ndarray) else extents,
                   dtype=np.uint64).reshape(-1, 2)
    if not len(a):
        return []
    s = np.maximum(a[:, 0], np.uint64(start))
    e = np.minimum(a[:, 1], np.uint64(end))
    keep = s < e
    s, e = s[keep], e[keep]
    if not len(s):
        return []
    c = np.uint64(chunk)
    s = np.maximum(s // c * c, np.uint64(start))
    e = np.minimum((e + c - np.uint64(1)) // c * c, np.uint64(end))
    order = np.argsort(s, kind="stable")
    s, e = s[order], np.maximum.accumulate(e[order])
    # a new run starts where a chunk begins past everything before it
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > e[:-1]
    first = np.flatnonzero(new)
    rs = s[first]
    re = e[np.append(first[1:] - 1, len(s) - 1)]
    if len(rs) > cap:
        gaps = rs[1:] - re[:-1]
        close = np.zeros(len(gaps), dtype=bool)
        close[np.argsort(gaps, kind="stable")[:len(rs) - cap]] = True
        new = np.ones(len(rs), dtype=bool)
        new[1:] = ~close
        first = np.flatnonzero(new)
        rs, re = rs[first], re[np.append(first[1:] - 1, len(rs) - 1)]
    return [(int(x), int(y)) for x, y in zip(rs, re)]


def runs(ranges) -> list[tuple[int, int]]:
    """Sorted (s, e) ranges with touching neighbours joined: what was one
    mapping before registering its chunks split it into several VMAs
    (/proc/PID/maps then lists each piece)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out
