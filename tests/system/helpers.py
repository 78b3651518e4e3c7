"""Shared bits for the system tests: addresses of Python buffers, libc calls
that release the GIL (a thread that faults on a uffd-registered page must not
hold it, or the resolving thread could never run), and bounded waits."""
import ctypes
import ctypes.util
import mmap
import os
import select
import threading

from uffdsrv._native import ffi

from tests.conftest import kernel_missing

PAGE = 4096
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
