"""Shared bits for the system tests: addresses of Python buffers, libc calls
that release the GIL (a thread that faults on a uffd-registered page must not
hold it, or the resolving thread could never run), bounded waits, and what
the running kernel's userfaultfd offers.

The features: UFFDIO_API answers with every feature the kernel has
(`uffdio_api.features` on return), whatever was asked; a request for one it
lacks fails with EINVAL. A case asks for the features it uses, and only
those, and is skipped, naming them, when the kernel lacks one: the kernel's
own tools/testing/selftests/mm/uffd-unit-tests.c lists a
`uffd_feature_required` per test the same way. The handshake is done once
per uffd, so the probe spends a uffd of its own."""
import ctypes
import ctypes.util
import functools
import mmap
import os
import select
import threading

import pytest
from uffdsrv._native import ffi

from tests.conftest import kernel_missing
from uffdsrv.core.pages import PAGE

WAIT = 5.0  # seconds: the longest any test waits for something that should happen

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.memset.restype = ctypes.c_void_p
libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
libc.memcpy.restype = ctypes.c_void_p


def root_missing() -> str | None:
    return kernel_missing()


# UFFD_FEATURE_* of <linux/userfaultfd.h>: bits of a stable ABI, named here so
# a kernel header older than the running kernel cannot hide one
FEATURES = {
    "PAGEFAULT_FLAG_WP": 1 << 0, "EVENT_FORK": 1 << 1, "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3, "MISSING_HUGETLBFS": 1 << 4, "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6, "SIGBUS": 1 << 7, "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9, "MINOR_SHMEM": 1 << 10, "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12, "WP_UNPOPULATED": 1 << 13, "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15, "MOVE": 1 << 16,
}
# what the server asks of an agent's uffd (uffd.REQUIRED_FEATURES), by name
SERVER = ("EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "THREAD_ID")


def feature_bits(names) -> int:
    bits = 0
    for n in names:
        bits |= FEATURES[n]
    return bits


@functools.cache
def kernel_features() -> int | None:
    """Every UFFD_FEATURE_* bit the running kernel offers; None when no
    uffd can be opened here (not root, no /dev/userfaultfd)."""
    if kernel_missing():
        return None
    from uffdsrv.system import uffd
    try:
        fd = uffd.open_uffd()
    except OSError:
        return None
    try:
        have = uffd.api(fd, 0)[0]
    except OSError:
        return None
    finally:
        os.close(fd)
    # UFFDSRV_TEST_WITHOUT=THREAD_ID,...: act as a kernel without them, to
    # see which cases skip
    hidden = os.environ.get("UFFDSRV_TEST_WITHOUT", "")
    return have & ~feature_bits(n.strip() for n in hidden.split(",") if n.strip())


def features_missing(names, have: int | None = None) -> str | None:
    """Why a case that needs these features cannot run here (or on a
    kernel offering `have`), or None."""
    if have is None:
        why = kernel_missing()
        if why:
            return why
        have = kernel_features()
        if have is None:
            return "cannot open a userfaultfd to ask its features"
    lacking = [n for n in names if not have & FEATURES[n]]
    if lacking:
        return "the kernel's userfaultfd lacks " + ", ".join(f"UFFD_FEATURE_{n}"
                                                                 for n in lacking)
    return None


def skip_unless_features(names) -> None:
    why = features_missing(names)
    if why:
        pytest.skip(why)


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def anon(npages: int) -> mmap.mmap:
    return mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def addr_of(buf) -> int:
    # the cdata from from_buffer dies at once, so the mmap can still be closed
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def pattern(nbytes: int, seed: int) -> bytes:
    """Bytes that differ from page to page and from offset to offset."""
    return bytes((i * 7 + (i >> 12) * 31 + seed) & 0xFF or 1 for i in range(nbytes))


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


class Worker(threading.Thread):
    """Runs fn in a daemon thread; records its result or exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result = self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def finish(self, timeout: float = WAIT):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still blocked after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


def read_page(addr: int) -> bytes:
    """Read one page through libc (GIL released while it faults)."""
    out = ctypes.create_string_buffer(PAGE)
    libc.memcpy(out, addr, PAGE)
    return out.raw


def close_quietly(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
