"""What the running kernel offers, found out by asking it.

A version number says little: distributions backport, configs differ
(CONFIG_USERFAULTFD, CONFIG_PTE_MARKER_UFFD_WP, io_uring disabled by a
sysctl), and a container may hide /dev/userfaultfd. So every feature is
probed by doing the smallest real thing with it, in this process, on a
scratch mapping, at start:

* userfaultfd: open one (the /dev/userfaultfd ioctl, else the syscall)
  and call UFFDIO_API with features = 0; the kernel answers with every
  feature it has (6.1: 0x1fff; 6.18 adds POISON 1<<14, WP_ASYNC 1<<15,
  MOVE 1<<16). Write-protect needs PAGEFAULT_FLAG_WP in that answer *and*
  a MODE_WP registration that grants UFFDIO_WRITEPROTECT (anonymous WP
  needs the arch's uffd-wp PTE bit). The events the agent asks for (FORK,
  REMAP, REMOVE, UNMAP, THREAD_ID) must all be there: without them a fork
  silently loses the child's pages and a program's own MADV_DONTNEED reads
  stale swap data, so the server refuses to run.
* UFFDIO_POISON (6.6+): a registration answers with the ioctls allowed on
  the range, a bit per _UFFDIO_* number; POISON is bit 0x08, and
  UFFD_FEATURE_POISON (1<<14) is in the UFFDIO_API answer.
* process_madvise(MADV_DONTNEED) on oneself: before 6.13 process_madvise
  takes only COLD, PAGEOUT, WILLNEED and COLLAPSE (EINVAL for DONTNEED,
  whoever the target); the PIDFD_SELF pseudo-fd is newer still (EBADF
  before). Both are tried on a touched scratch page, which must then read
  as zeros. Without either the agent zaps with one madvise() per merged
  range: the same pages dropped, but one TLB shootdown per range instead
  of one per batch (the batched flush itself is 6.16+, and cannot be seen
  from user space).
* PAGEMAP_SCAN (6.7+): an ioctl on /proc/self/pagemap; older kernels have
  no ioctl there at all (ENOTTY). Asked for the present pages of a scratch
  mapping with one touched page, it must find exactly that page.
* RWF_DONTCACHE (6.14+): a flag of preadv2; an older kernel, or a
  filesystem that lacks it, answers EOPNOTSUPP. It depends on the
  filesystem, so it is probed on a temporary file in the swap file's
  directory (swapdev.probe reads one page with the flag).
* io_uring: IORING_REGISTER_PROBE on a throwaway ring says which opcodes
  the kernel knows (io_uring_setup itself fails with EPERM where
  kernel.io_uring_disabled forbids it, ENOSYS where it is not built).

A page whose swap slot cannot be read must end as the kernel ends a swap
page it cannot read: SIGBUS for the program that touched it, never zeros
or another page's bytes. `fail_page` does it with what the kernel has:

* UFFDIO_POISON installs a poison marker in the page table and wakes the
  faulting thread; its retry, and every later touch, raises SIGBUS
  (BUS_MCEERR_AR, si_addr the page), exactly as a hardware-poisoned page.
* without it (before 6.6), SIGBUS is sent to the process through its
  pidfd (pidfd_send_signal: no pid-reuse race, and no thread id that a
  pid namespace would make wrong). The fatal signal wakes the thread
  blocked in the fault and the process dies of SIGBUS, as it would with
  the marker. What differs: si_code is SI_USER with no si_addr, so a
  program's own SIGBUS handler cannot tell which page failed, and it can
  return into the same fault (which then fails again); a fault taken
  inside a syscall (read() into the page) kills the process instead of
  failing the syscall with EFAULT.

Each feature carries what its absence costs; `Kernel.missing_line()` is
the one log line the server prints at start, and `Kernel.refusal()` names
what the server cannot run without.
"""
import errno
import fcntl
import mmap
import os
import signal
import struct
import tempfile

from .._native import ffi, lib
from ..core.pages import PAGE
from . import swapdev, uffd

# name -> (required, what its absence costs)
FEATURES = {
    "userfaultfd": (True, "no userfaultfd: nothing can be managed"),
    "uffd_wp": (True, "no write-protect on anonymous memory: a page cannot be held "
                      "still while it is written out"),
    "uffd_events": (True, "no FORK/REMAP/REMOVE/UNMAP/THREAD_ID events: forks and the "
                          "program's own MADV_DONTNEED would lose or corrupt pages"),
    "io_uring": (True, "no io_uring with the opcodes the server uses"),
    "process_madvise_self": (False, "the agent zaps through a pidfd of its own"),
    "process_madvise_dontneed": (False, "the agent zaps with one madvise per merged range: "
                                        "a TLB shootdown per range, not per batch"),
    "uffdio_poison": (False, "the SIGBUS for an unreadable swap slot is a signal sent "
                             "through the program's pidfd (no si_addr), not a poisoned PTE"),
    "pagemap_scan": (False, "page presence is read from /proc/PID/pagemap entries"),
    "rwf_dontcache": (False, "a swap file without O_DIRECT is written buffered, then "
                             "sync_file_range + POSIX_FADV_DONTNEED"),
    "uffd_wp_async": (False, "none today (not used)"),
    "uffd_move": (False, "none today (not used)"),
}

EVENT_FEATURES = uffd.REQUIRED_FEATURES
IORING_OPS = {"READ": lib.IORING_OP_READ, "WRITE": lib.IORING_OP_WRITE,
              "READV": lib.IORING_OP_READV, "WRITEV": lib.IORING_OP_WRITEV,
              "READ_FIXED": lib.IORING_OP_READ_FIXED, "WRITE_FIXED": lib.IORING_OP_WRITE_FIXED,
              "ASYNC_CANCEL": lib.IORING_OP_ASYNC_CANCEL}
PAGE_IS_PRESENT = 1 << 3
_PM_SCAN_ARG = struct.Struct("<12Q")  # struct pm_scan_arg: 96 bytes
_PAGE_REGION = struct.Struct("<3Q")   # struct page_region: start, end, categories


class Kernel:
    """The probe's answer: `features` maps each name of FEATURES to True or
    False, `details` says what the kernel answered for each."""

    def __init__(self, release: str, version: str, uffd_features: int,
                 features: dict[str, bool], details: dict[str, str]):
        self.release, self.version = release, version
        self.uffd_features = uffd_features
        self.features, self.details = features, details

    def missing(self) -> list[str]:
        return [n for n in FEATURES if not self.features.get(n)]

    def refusal(self) -> str | None:
        """One line naming what the server cannot run without, or None."""
        gone = [n for n in self.missing() if FEATURES[n][0]]
        if not gone:
            return None
        return (f"this kernel ({self.release}) lacks what uffdsrv needs: "
                + "; ".join(f"{n} ({self.details.get(n, '?')})" for n in gone))

    def missing_line(self) -> str:
        """What is missing and what that costs, for the log at start."""
        gone = self.missing()
        if not gone:
            return f"kernel {self.release}: every feature probed is present"
        # without any DONTNEED by process_madvise, the pidfd one says it all
        if "process_madvise_dontneed" in gone and "process_madvise_self" in gone:
            gone.remove("process_madvise_self")
        return (f"kernel {self.release} lacks " + ", ".join(gone) + ": "
                + "; ".join(f"{n}: {FEATURES[n][1]}" for n in gone))

    def as_json(self) -> dict:
        return {"release": self.release, "version": self.version,
                "uffd_features": self.uffd_features, "features": dict(self.features),
                "missing": self.missing()}


def _anon(npages: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, npages * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, swapdev.address(m)


def _open_uffd() -> tuple[int, str]:
    """A uffd for the probe. Not being allowed one (EPERM, EACCES: not root,
    vm.unprivileged_userfaultfd 0) is not a missing feature: one that
    handles only user-mode faults is allowed to anybody (5.11+), and the
    kernel answers UFFDIO_API the same on it."""
    try:
        return uffd.open_uffd(), ""
    except PermissionError as e:
        fd = lib.ufs_uffd_open(os.O_CLOEXEC | os.O_NONBLOCK | lib.UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise e from None
        return fd, ", user-mode faults only (not allowed more)"


def _probe_uffd(features: dict, details: dict) -> int:
    try:
        fd, note = _open_uffd()
    except OSError as e:
        details["userfaultfd"] = e.strerror or str(e)
        return 0
    m = None
    try:
        granted, _ = uffd.api(fd, 0)
        features["userfaultfd"] = True
        details["userfaultfd"] = f"UFFDIO_API features {granted:#x}{note}"
        ev = granted & EVENT_FEATURES
        features["uffd_events"] = ev == EVENT_FEATURES
        details["uffd_events"] = f"{ev:#x} of {EVENT_FEATURES:#x}"
        features["uffd_wp_async"] = bool(granted & lib.UFFD_FEATURE_WP_ASYNC)
        features["uffd_move"] = bool(granted & lib.UFFD_FEATURE_MOVE)
        m, addr = _anon(1)
        wp_flag = bool(granted & lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        mode = uffd.REGISTER_MODE_MISSING | (uffd.REGISTER_MODE_WP if wp_flag else 0)
        try:
            ioctls = uffd.register(fd, addr, PAGE, mode)
        except OSError as e:
            details["uffd_wp"] = f"UFFDIO_REGISTER: {e.strerror}"
            return granted
        uffd.unregister(fd, addr, PAGE)
        wp = wp_flag and bool(ioctls & (1 << 0x06))  # _UFFDIO_WRITEPROTECT
        features["uffd_wp"] = wp
        details["uffd_wp"] = f"register ioctls {ioctls:#x}" if wp_flag else \
            "no UFFD_FEATURE_PAGEFAULT_FLAG_WP"
        features["uffdio_poison"] = bool(granted & lib.UFFD_FEATURE_POISON
                                         and ioctls & (1 << lib._UFFDIO_POISON))
        details["uffdio_poison"] = f"register ioctls {ioctls:#x}"
        return granted
    finally:
        os.close(fd)
        if m is not None:
            m.close()


def _zaps(m: mmap.mmap, addr: int, pidfd: int) -> str | None:
    """process_madvise(pidfd, DONTNEED) of a touched page: None if the page
    then reads as zeros, else what went wrong."""
    m[0:1] = b"\x5a"
    n = lib.ufs_process_madvise(pidfd, ffi.new("uint64_t[]", [addr]),
                                ffi.new("uint64_t[]", [PAGE]), 1, lib.MADV_DONTNEED)
    if n < 0:
        return f"process_madvise: {errno.errorcode.get(-n, -n)}"
    if n != PAGE or m[0] != 0:
        return f"process_madvise returned {n} and the page kept its byte"
    return None


def _probe_zap(features: dict, details: dict) -> None:
    m, addr = _anon(1)
    try:
        why = _zaps(m, addr, lib.PIDFD_SELF)
        features["process_madvise_self"] = why is None
        details["process_madvise_self"] = why or "PIDFD_SELF zapped a page"
        try:
            pidfd = os.pidfd_open(os.getpid())
        except OSError as e:
            details["process_madvise_dontneed"] = f"pidfd_open: {e.strerror}"
            return
        try:
            why = _zaps(m, addr, pidfd)
        finally:
            os.close(pidfd)
        features["process_madvise_dontneed"] = why is None
        details["process_madvise_dontneed"] = why or "own pidfd zapped a page"
    finally:
        m.close()


def _probe_pagemap_scan(features: dict, details: dict) -> None:
    m, addr = _anon(2)
    vec = bytearray(_PAGE_REGION.size * 2)
    arg = bytearray(_PM_SCAN_ARG.size)
    try:
        m[PAGE:PAGE + 1] = b"\x01"  # only the second page is present
        vaddr = swapdev.address(vec)
        _PM_SCAN_ARG.pack_into(arg, 0, _PM_SCAN_ARG.size, 0, addr, addr + 2 * PAGE, 0,
                               vaddr, 2, 0, 0, 0, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            try:
                n = fcntl.ioctl(f.fileno(), lib.PAGEMAP_SCAN, arg)
            except OSError as e:
                details["pagemap_scan"] = f"PAGEMAP_SCAN: {errno.errorcode.get(e.errno)}"
                return
        start, end, _ = _PAGE_REGION.unpack_from(vec, 0)
        ok = n == 1 and (start, end) == (addr + PAGE, addr + 2 * PAGE)
        features["pagemap_scan"] = ok
        details["pagemap_scan"] = "found the one present page" if ok else \
            f"PAGEMAP_SCAN returned {n} regions, first {start:#x}-{end:#x}"
    finally:
        m.close()


def _probe_dontcache(features: dict, details: dict, directory: str | None) -> None:
    buf = swapdev.AlignedBuffer(PAGE)
    try:
        with tempfile.TemporaryFile(dir=directory) as f:
            os.pwrite(f.fileno(), b"\0" * PAGE, 0)
            r = swapdev.probe(f.fileno(), buf.addr, swapdev.RWF_DONTCACHE)
        features["rwf_dontcache"] = r == 0
        details["rwf_dontcache"] = "preadv2 accepted it" if r == 0 else \
            f"preadv2(RWF_DONTCACHE): {errno.errorcode.get(-r, -r)}"
    except OSError as e:
        details["rwf_dontcache"] = f"temporary file in {directory}: {e.strerror}"
    finally:
        buf.close()


def _probe_io_uring(features: dict, details: dict) -> None:
    ops = ffi.new("uint8_t[]", 256)
    n = lib.ufs_ring_probe_ops(ops, 256)
    if n < 0:
        details["io_uring"] = f"io_uring_setup: {errno.errorcode.get(-n, -n)}"
        return
    lacking = [name for name, op in IORING_OPS.items() if not ops[op]]
    features["io_uring"] = not lacking
    details["io_uring"] = f"{n} opcodes known" + (f"; lacks {', '.join(lacking)}"
                                                  if lacking else "")


def probe(directory: str | None = None) -> Kernel:
    """Ask the running kernel. `directory`: where the swap file lives, for
    the filesystem-dependent probes (default: the temporary directory).
    UFFDSRV_KERNEL_HIDE=name,... reports those features missing whatever
    the kernel says: how a test shows a refusal on a kernel that has all."""
    features = {n: False for n in FEATURES}
    details: dict[str, str] = {}
    granted = _probe_uffd(features, details)
    _probe_zap(features, details)
    _probe_pagemap_scan(features, details)
    _probe_dontcache(features, details, directory)
    _probe_io_uring(features, details)
    for name in filter(None, os.environ.get("UFFDSRV_KERNEL_HIDE", "").split(",")):
        if name in features:
            features[name] = False
            details[name] = "hidden by UFFDSRV_KERNEL_HIDE"
    u = os.uname()
    return Kernel(u.release, u.version, granted, features, details)


def fail_page(fd: int, addr: int, pidfd: int, poison: bool) -> None:
    """End the fault on the page at addr with SIGBUS for its program (see
    the top of this file): UFFDIO_POISON when `poison` (the feature
    uffdio_poison), else the signal through `pidfd`."""
    if poison:
        arg = bytearray(struct.pack("<QQQq", addr & -PAGE, PAGE, 0, 0))
        try:
            fcntl.ioctl(fd, lib.UFFDIO_POISON, arg)
        except OSError as e:
            raise OSError(e.errno, f"UFFDIO_POISON: {e.strerror}") from None
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGBUS)
    except OSError as e:
        raise OSError(e.errno, f"pidfd_send_signal(SIGBUS): {e.strerror}") from None


_current: Kernel | None = None


def current(directory: str | None = None) -> Kernel:
    """The probe, run once per process: the server asks at start (with its
    swap file's directory) and reports the same answer ever after."""
    global _current
    if _current is None:
        _current = probe(directory)
    return _current
