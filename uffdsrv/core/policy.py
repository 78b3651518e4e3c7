"""Which pages to reclaim next. For now: resident pages in address order,
continuing where the last pass stopped, one region per batch (a batch's
pages are then a few long runs: one write-protect ioctl, one iovec and one
REMOVE event per run)."""
import numpy as np

from .pages import RESIDENT, PageMap, Region


def pick(pages: PageMap, limit: int, cursor: int = 0) -> tuple[Region | None, np.ndarray]:
    """Up to `limit` resident pages of one region, not held by a batch,
    starting at the first region at or above address `cursor` (wrapping)."""
    regions = pages.regions
    if not regions or limit <= 0:
        return None, np.zeros(0, dtype=np.int64)
    first = next((i for i, r in enumerate(regions) if r.end > cursor), 0)
    for k in range(len(regions)):
        r = regions[(first + k) % len(regions)]
        lo = max(0, (cursor - r.start) // 4096) if k == 0 else 0
        idx = np.flatnonzero((r.state[lo:] == RESIDENT) & (r.batch[lo:] == 0))[:limit] + lo
        if len(idx) == 0 and lo:
            idx = np.flatnonzero((r.state == RESIDENT) & (r.batch == 0))[:limit]
        if len(idx):
            return r, idx.astype(np.int64)
    return None, np.zeros(0, dtype=np.int64)
