"""Other processes: pidfds, their memory, their maps.

process_madvise(MADV_DONTNEED) on *another* process is refused (EINVAL; the
2021 RFC was never merged), which is why the agent inside the managed
process zaps, through process_madvise(PIDFD_SELF), up to 1024 ranges and one
TLB shootdown per call. From outside, the server may only read memory
(process_vm_readv) and give hints (COLD, PAGEOUT, COLLAPSE).

process_vm_readv on a page that is missing in a uffd-registered range
faults through that uffd and blocks until somebody resolves the fault: it
must never run on the thread that resolves faults.

/proc/PID/pagemap gives one u64 per page: bit 63 present, bit 62 swapped
(by the kernel). Reading it does not fault the target in.
"""
import os
import struct

import numpy as np

from .._native import ffi, lib
from ..core.pages import PAGE
from .errors import check, raise_errno
from .uffd import _ptr, _u64

MADV_DONTNEED = lib.MADV_DONTNEED
MADV_PAGEOUT = lib.MADV_PAGEOUT
MADV_COLLAPSE = lib.MADV_COLLAPSE


def pidfd_open(pid: int) -> int:
    return check(lib.ufs_pidfd_open(pid, 0), "pidfd_open", pid)


def pidfd_getfd(pidfd: int, targetfd: int, pid: int | None = None) -> int:
    return check(lib.ufs_pidfd_getfd(pidfd, targetfd, 0), "pidfd_getfd", pid)


def process_madvise(pidfd: int, start, length, advice: int) -> int:
    start, length = _u64(start), _u64(length)
    return check(lib.ufs_process_madvise(pidfd, _ptr(start, "uint64_t *"),
                                         _ptr(length, "uint64_t *"), len(start), advice),
                 "process_madvise")


def vm_readv(pid: int, dest_addr: int, start, length) -> int:
    """Read remote ranges back to back into our memory at dest_addr.
    Releases the GIL for the whole call (cffi does), so it can run in a
    worker thread while the event loop resolves the faults it may raise."""
    start, length = _u64(start), _u64(length)
    return check(lib.ufs_vm_readv(pid, ffi.cast("void *", dest_addr), _ptr(start, "uint64_t *"),
                                  _ptr(length, "uint64_t *"), len(start)),
                 "process_vm_readv", pid)


def zero_pages(addr: int, npages: int) -> np.ndarray:
    out = np.zeros(npages, dtype=np.uint8)
    lib.ufs_zero_pages(ffi.cast("void *", addr), npages, _ptr(out, "uint8_t *"))
    return out.view(bool)


def tlb_shootdowns() -> int | None:
    """Sum of the TLB row of /proc/interrupts (x86), None where there is none."""
    n = lib.ufs_tlb_shootdowns()
    return None if n < 0 else n


def read_maps(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError as e:
        raise_errno(e.errno or 3, "read /proc/PID/maps", pid)


def pagemap_present(pid: int, start: int, npages: int) -> np.ndarray:
    """Which pages of [start, start+npages*PAGE) hold data, as bool: present
    in RAM, or in the kernel's own swap."""
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise_errno(e.errno or 3, "open /proc/PID/pagemap", pid)
    try:
        raw = os.pread(fd, npages * 8, (start // PAGE) * 8)
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, dtype=np.uint64)
    have = (entries >> np.uint64(62)) & np.uint64(3)
    out = np.zeros(npages, dtype=bool)
    out[: len(have)] = have != 0
    return out


def peer_credentials(sock) -> tuple[int, int, int]:
    import socket
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)
