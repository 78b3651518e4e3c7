"""userfaultfd: how the kernel behaves, as measured on Linux 6.18.

A uffd belongs to the mm of the process that created it, whoever holds the
fd later: the server receives the agent's uffd over SCM_RIGHTS and then
registers, write-protects and fills the *agent's* memory with ioctls on it.

Reading the fd yields 32-byte `struct uffd_msg`s. The kernel hands out
pending page faults before pending events, so a fault can be read before an
event (REMAP, REMOVE) that happened earlier; what keeps this safe is that
while such an event is unread, UFFDIO_COPY and UFFDIO_ZEROPAGE fail with
EAGAIN ("the mm is changing"). The rule is then: on EAGAIN, read and apply
the pending events, yield so the thread that raised them can run again, and
retry. The condition clears when that thread runs, not when the event is
read, so sleeping on EAGAIN only makes everything slower.

REMOVE is raised *before* MADV_DONTNEED zaps, and the zapping thread waits
until the event has been read; the zap happens after. One REMOVE per range
of a vectored process_madvise, which is why the server merges adjacent pages
into one range. The message does not say who zapped.

FORK installs a new uffd for the child into the reader's fd table at the
moment the event is read; the forking thread waits for that read.

Write-protect (UFFDIO_WRITEPROTECT) applies to present pages of a range
registered with MODE_WP; a write to a protected page raises a fault with
UFFD_PAGEFAULT_FLAG_WP and waits until the range is unprotected or woken.
MADV_DONTNEED on anonymous memory drops the protection with the page, so a
zapped page faults as missing again.

The helpers take numpy uint64 arrays and run one C loop per batch.
"""
import numpy as np

from .._native import ffi, lib
from .errors import check

API = lib.UFFD_API
EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
EVENT_FORK = lib.UFFD_EVENT_FORK
EVENT_REMAP = lib.UFFD_EVENT_REMAP
EVENT_REMOVE = lib.UFFD_EVENT_REMOVE
EVENT_UNMAP = lib.UFFD_EVENT_UNMAP
PAGEFAULT_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
PAGEFAULT_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
FEATURE_EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
FEATURE_EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
FEATURE_EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
FEATURE_EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
FEATURE_THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
FEATURE_WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
FEATURE_MOVE = lib.UFFD_FEATURE_MOVE
REGISTER_MODE_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
REGISTER_MODE_WP = lib.UFFDIO_REGISTER_MODE_WP
COPY_MODE_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
WRITEPROTECT_MODE_WP = lib.UFFDIO_WRITEPROTECT_MODE_WP
MSG_SIZE = 32

# What the server needs from an agent's uffd.
REQUIRED_FEATURES = (FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE
                     | FEATURE_EVENT_UNMAP | FEATURE_THREAD_ID)

# struct uffd_msg as numpy sees it: event at 0, then the union as three
# u64 words. pagefault: flags, address, ptid (low half of a2); fork: ufd
# (low half of a0); remap: from, to, len; remove/unmap: start, end.
MSG_DTYPE = np.dtype({"names": ["event", "a0", "a1", "a2"],
                      "formats": ["u1", "<u8", "<u8", "<u8"],
                      "offsets": [0, 8, 16, 24], "itemsize": MSG_SIZE})


def parse(buf, nbytes: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=MSG_DTYPE, count=nbytes // MSG_SIZE)


def open_uffd(nonblock: bool = True) -> int:
    flags = 0o2000000 | (0o4000 if nonblock else 0)  # O_CLOEXEC | O_NONBLOCK
    return check(lib.ufs_uffd_open(flags), "userfaultfd")


def api(fd: int, features: int) -> tuple[int, int]:
    granted = ffi.new("uint64_t *")
    ioctls = ffi.new("uint64_t *")
    check(lib.ufs_uffd_api(fd, features, granted, ioctls), "UFFDIO_API")
    return granted[0], ioctls[0]


def register(fd: int, start: int, length: int, mode: int) -> int:
    ioctls = ffi.new("uint64_t *")
    check(lib.ufs_uffd_register(fd, start, length, mode, ioctls), "UFFDIO_REGISTER")
    return ioctls[0]


def unregister(fd: int, start: int, length: int) -> None:
    check(lib.ufs_uffd_unregister(fd, start, length), "UFFDIO_UNREGISTER")


def _u64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint64)


def _ptr(a: np.ndarray, ctype: str):
    # from_buffer is several times cheaper than a.ctypes.data, which counts
    # on the fault path; the array must outlive the call, as it does here.
    return ffi.from_buffer(ctype.replace(" *", "[]"), a)


def copy(fd: int, dst, src, length, mode: int = 0) -> tuple[int, np.ndarray]:
    """UFFDIO_COPY each (dst, src, len). Returns (attempted, result): result
    holds bytes copied or -errno per entry; attempted < len(dst) means the
    batch stopped on EAGAIN and the rest was not tried."""
    dst, src, length = _u64(dst), _u64(src), _u64(length)
    if not len(dst) == len(src) == len(length):
        raise ValueError("copy: dst, src and length differ in size")
    result = np.zeros(len(dst), dtype=np.int64)
    n = lib.ufs_uffd_copy_batch(fd, _ptr(dst, "uint64_t *"), _ptr(src, "uint64_t *"),
                                _ptr(length, "uint64_t *"), len(dst), mode,
                                _ptr(result, "int64_t *"))
    return n, result


def zeropage(fd: int, dst, length) -> tuple[int, np.ndarray]:
    """UFFDIO_ZEROPAGE each range; same contract as copy()."""
    dst, length = _u64(dst), _u64(length)
    if len(dst) != len(length):
        raise ValueError("zeropage: dst and length differ in size")
    result = np.zeros(len(dst), dtype=np.int64)
    n = lib.ufs_uffd_zeropage_batch(fd, _ptr(dst, "uint64_t *"), _ptr(length, "uint64_t *"),
                                    len(dst), _ptr(result, "int64_t *"))
    return n, result


def writeprotect(fd: int, start, length, protect: bool) -> None:
    """Protect or release every range; raises for the first that failed
    after trying them all."""
    start, length = _u64(start), _u64(length)
    if len(start):
        mode = WRITEPROTECT_MODE_WP if protect else 0
        check(lib.ufs_uffd_writeprotect_batch(fd, _ptr(start, "uint64_t *"),
                                              _ptr(length, "uint64_t *"), len(start), mode),
              "UFFDIO_WRITEPROTECT")


def wake(fd: int, start, length) -> None:
    start, length = _u64(start), _u64(length)
    if len(start):
        check(lib.ufs_uffd_wake_batch(fd, _ptr(start, "uint64_t *"),
                                      _ptr(length, "uint64_t *"), len(start)), "UFFDIO_WAKE")

