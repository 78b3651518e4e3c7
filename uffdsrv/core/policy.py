"""Which pages to reclaim next. For now: resident pages in address order,
continuing where the last pass stopped, one region per batch (a batch's
pages are then a few long runs: one write-protect ioctl, one iovec and one
REMOVE event per run)."""
import numpy as np

from .pages import PAGE, RESIDENT, PageMap, Region


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
