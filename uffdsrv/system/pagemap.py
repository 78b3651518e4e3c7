"""PAGEMAP_SCAN: the extents of a range that hold data, without a word per page.

Reading /proc/PID/pagemap costs 8 bytes per page of the range asked for,
present or not: 32 MB and tens of ms for a 16 GiB mapping, gigabytes for a
sanitizer's shadow. Linux 6.7 added an ioctl on the same file,
PAGEMAP_SCAN (struct pm_scan_arg, 96 bytes): the kernel walks the page
tables of [start, end) — skipping whole empty PMDs and PUDs, so unused
address space costs next to nothing — and fills a caller's array of
struct page_region {start, end, categories} with the runs of pages whose
categories match, neighbours of equal categories joined into one run. It
returns how many it filled; when the array is full it stops and says in
walk_end where, and the caller asks again from there.

Categories asked for here: PAGE_IS_PRESENT (in RAM, the zero page
included) or PAGE_IS_SWAPPED (in the kernel's own swap), which is what
proc.pagemap_present calls "holds data". The ioctl needs the same access
as reading the file (PTRACE_MODE_READ of the target); a kernel without it
answers ENOTTY, and kernel.py's probe finds that out at start.

The walk takes the target's mmap lock for reading, so it runs in an
executor thread, never on the event loop.
"""
import fcntl
import os
import struct

import numpy as np

from .._native import lib
from .errors import raise_errno
from .swapdev import address

PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
_ARG = struct.Struct("<12Q")     # struct pm_scan_arg
_REGION = struct.Struct("<3Q")   # struct page_region
VEC = 4096                       # regions per ioctl: 96 KiB of buffer


def present_extents(pid: int, start: int, end: int, vec: int = VEC) -> np.ndarray:
    """(n, 2) uint64 array of [s, e) runs of [start, end) that hold data
    (present or in the kernel's swap), in address order."""
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise_errno(e.errno or 3, "open /proc/PID/pagemap", pid)
    buf = bytearray(_REGION.size * vec)
    arg = bytearray(_ARG.size)
    out = []
    try:
        at = start
        while at < end:
            want = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
            _ARG.pack_into(arg, 0, _ARG.size, 0, at, end, 0, address(buf), vec, 0,
                           0, 0, want, want)
            try:
                n = fcntl.ioctl(fd, lib.PAGEMAP_SCAN, arg)
            except OSError as e:
                raise_errno(e.errno, "ioctl PAGEMAP_SCAN", pid)
            if n:
                got = np.frombuffer(buf, dtype=np.uint64, count=3 * n).reshape(n, 3)
                out.append(got[:, :2].copy())
            walk_end = _ARG.unpack_from(arg, 0)[4]
            if n < vec or walk_end <= at:
                break
            at = walk_end
    finally:
        os.close(fd)
    if not out:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.concatenate(out)
