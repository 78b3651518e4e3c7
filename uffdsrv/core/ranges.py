"""Turning page indices into ranges: one ioctl, one iovec, one write per run
of adjacent pages instead of one per page."""
import numpy as np

PAGE = 4096  # the one page size every module uses: userfaultfd works in base pages


def runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted page indices -> (first index, length) of each run of adjacent
    pages."""
    idx = np.asarray(idx, dtype=np.int64)
    if not len(idx):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    return idx[starts], ends - starts


def paired_runs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs along which both a and b advance by one (pages whose slots are
    also adjacent: one contiguous write). Returns (position in a, length)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero((np.diff(a) != 1) | (np.diff(b) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(a)]))
    return starts, ends - starts


def byte_ranges(base: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Page indices of a region at address base -> (start, length) in bytes,
    adjacent pages merged."""
    first, count = runs(idx)
    return (base + first * PAGE).astype(np.uint64), (count * PAGE).astype(np.uint64)
