"""Which pages to reclaim next.

The server sees no access bits, but it sees every page come back: a page
faulted in from swap soon after it was reclaimed was hot, and so was one
written while in flight. Each such return adds to the page's heat, which
is halved every so often so that old history fades (an LFU with aging).

  coldest  (default) lowest heat first, then the longest resident
  fifo     the longest resident first: the order pages arrived in
  random   any resident page
  address  address order from a cursor (one pass over everything, for an
           explicit full reclaim)

A batch takes pages of one region (one write-protect ioctl and one REMOVE
per run of pages): the region holding most of the chosen pages.
"""
import time

import numpy as np

from .pages import PAGE, RESIDENT, PageMap, Region


def now_ms() -> int:
    """The page map's clock (`stamp`): monotonic milliseconds, 32 bits."""
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


def warm(r: Region, i: int) -> None:
    """The page came back soon after it was taken: it is hot."""
    if r.heat[i] < 255:
        r.heat[i] += 1
    r.stamp[i] = now_ms()


def pick(pages: PageMap, limit: int, cursor: int = 0) -> tuple[Region | None, np.ndarray]:
    """Up to `limit` resident pages of one region, not held by a batch,
    starting at the first region at or above address `cursor` (wrapping)."""
    regions = pages.regions
    if not regions or limit <= 0:
        return None, np.zeros(0, dtype=np.int64)
    first = next((i for i, r in enumerate(regions) if r.end > cursor), None)
    if first is None:  # past the last region: wrap
        first, cursor = 0, 0
    # the part of the first region above the cursor, every other region in
    # address order (wrapping), then the part of the first below the cursor
    order = [(first, max(0, (cursor - regions[first].start) // PAGE), None)]
    order += [((first + k) % len(regions), 0, None) for k in range(1, len(regions))]
    order.append((first, 0, order[0][1]))
    for i, lo, hi in order:
        r = regions[i]
        idx = np.flatnonzero((r.state[lo:hi] == RESIDENT) & (r.batch[lo:hi] == 0))[:limit] + lo
        if len(idx):
            return r, idx.astype(np.int64)
    return None, np.zeros(0, dtype=np.int64)


POLICIES = ("coldest", "fifo", "random", "address")


def choose(pages: PageMap, limit: int, policy: str, rng: np.random.Generator | None = None,
           cursor: int = 0) -> tuple[Region | None, np.ndarray]:
    """Up to `limit` resident pages of one region, not held by a batch, in
    the order the policy prefers."""
    if policy == "address":
        return pick(pages, limit, cursor)
    cands = []
    for r in pages.regions:
        idx = np.flatnonzero((r.state == RESIDENT) & (r.batch == 0))
        if len(idx):
            cands.append((r, idx))
    if not cands or limit <= 0:
        return None, np.zeros(0, dtype=np.int64)
    which = np.concatenate([np.full(len(idx), k) for k, (_, idx) in enumerate(cands)])
    if policy == "random":
        key = (rng or np.random.default_rng()).random(len(which))
    else:
        stamp = np.concatenate([r.stamp[idx] for r, idx in cands]).astype(np.uint64)
        key = stamp
        if policy == "coldest":
            heat = np.concatenate([r.heat[idx] for r, idx in cands]).astype(np.uint64)
            key = (heat << np.uint64(32)) | stamp
    take = min(limit, len(key))
    best = np.argpartition(key, take - 1)[:take] if take < len(key) else np.arange(len(key))
    k = np.bincount(which[best]).argmax()
    offsets = np.concatenate(([0], np.cumsum([len(idx) for _, idx in cands])))
    mine = best[which[best] == k] - offsets[k]
    r, idx = cands[k]
    return r, np.sort(idx[mine]).astype(np.int64)


def age(pages: PageMap) -> None:
    """Halve every page's heat: what made a page hot long ago counts less."""
    for r in pages.regions:
        r.heat >>= 1
