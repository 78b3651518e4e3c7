"""The swap device: how the kernel caches a file, and how to keep our swap
I/O out of that cache.

A plain write() to a file copies the bytes into the page cache and marks
those pages dirty; writeback sends them to the disk seconds later, and even
then the clean pages stay cached until memory runs short. For a swap file
that is the wrong place: reclaiming 512 MiB through the page cache raised
MemFree by 60 MiB and grew the cache by 526 MiB (512 MiB of it dirty), and
every later fault-in read the cache, not the disk. The memory had only
moved from the program into the kernel.

O_DIRECT skips the cache: the kernel pins our buffer and the device DMAs
into or out of it. Buffer address, length and file offset must be aligned
to the device's logical block size (512 or 4096 bytes), else the call
fails with EINVAL and nothing is transferred; we align everything to 4 KiB
(one slot), and the ring's arena is an anonymous mmap, so page-aligned. A
filesystem without direct I/O refuses the open() with EINVAL (some accept
the open and refuse the first read, so it is probed). tmpfs accepts
O_DIRECT since Linux 6.6, but there the page cache *is* the file: a swap
file on tmpfs or ramfs frees nothing, whatever the mode.

Where direct I/O is refused, two buffered fallbacks keep the cache empty:

* RWF_DONTCACHE (Linux 6.14, per call, as preadv2/pwritev2 flags and
  io_uring's rw_flags): a write starts writeback of its range at once and
  the pages are meant to be dropped when writeback completes; a read drops
  the pages it read. Measured here (6.18, ext4): reads and first writes
  into fallocated blocks leave nothing cached, but an overwrite leaves
  every page cached (clean) for good, so written pages still get the
  sync_file_range + DONTNEED below, with their writeback already started.
  A filesystem that lacks the flag (or an older kernel, which knows no
  such flag) answers EOPNOTSUPP, so it is probed with a one-page read.
* otherwise sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER) of what was
  written (the pages are clean when it returns; this is not fsync: no
  metadata, no disk cache flush), then posix_fadvise(DONTNEED), which drops
  clean cached pages of the range (dirty or locked ones it skips, hence
  the sync first). After a read, DONTNEED alone.

A sparse file's first writes allocate blocks (ext4: ~600 MB/s here against
8.7 GB/s for overwrites through the cache); fallocate() allocates them up
front, as swapon(2) demands of the kernel's own swap files. The blocks are
"unwritten": they read as zeros, and the first write to one only flips its
extent to written. Filesystems without fallocate answer EOPNOTSUPP.

mincore(2) over a shared mapping of the file (touching no page) says which
of its pages are in the page cache: what util-linux's fincore counts.
"""
import errno
import fcntl
import mmap
import os

from .._native import ffi, lib
from ..core.pages import PAGE
from .errors import check, raise_errno

O_DIRECT = os.O_DIRECT
RWF_DONTCACHE = lib.RWF_DONTCACHE
MEMORY_FS = {lib.TMPFS_MAGIC: "tmpfs", lib.RAMFS_MAGIC: "ramfs"}
_SYNC_ALL = (lib.SYNC_FILE_RANGE_WAIT_BEFORE | lib.SYNC_FILE_RANGE_WRITE
             | lib.SYNC_FILE_RANGE_WAIT_AFTER)


def fs_type(fd: int) -> int:
    """The filesystem's magic number (statfs f_type)."""
    t = ffi.new("int64_t *")
    check(lib.ufs_fs_type(fd, t), "fstatfs")
    return t[0] & 0xFFFFFFFF


def memory_fs(fd: int) -> str | None:
    """'tmpfs' or 'ramfs' when the file lives in memory, else None."""
    return MEMORY_FS.get(fs_type(fd))


def has_direct(fd: int) -> bool:
    """Whether the open file has O_DIRECT (what /proc/self/fdinfo shows)."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def set_direct(fd: int, on: bool) -> None:
    """O_DIRECT is one of the few flags F_SETFL may change on an open file."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT if on else flags & ~O_DIRECT)


def allocate(fd: int, offset: int, length: int) -> None:
    """fallocate(mode 0): allocate blocks for [offset, offset + length),
    extending the file; blocks already allocated keep their data."""
    check(lib.ufs_fallocate(fd, 0, offset, length), "fallocate")


def sync_range(fd: int, offset: int, length: int) -> None:
    """Write back [offset, offset + length) and wait until it is clean."""
    check(lib.ufs_sync_file_range(fd, offset, length, _SYNC_ALL), "sync_file_range")


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop the clean cached pages of the range (POSIX_FADV_DONTNEED)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise_errno(e.errno, "posix_fadvise(DONTNEED)")


def no_readahead(fd: int) -> None:
    """POSIX_FADV_RANDOM: buffered reads bring in only the pages asked for
    (a DONTCACHE read drops what it read, not what readahead added)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except OSError as e:
        raise_errno(e.errno, "posix_fadvise(RANDOM)")


def cached_pages(fd: int, offset: int = 0, length: int | None = None) -> int:
    """How many pages of [offset, offset + length) (default: the whole
    file) are in the page cache, read with mincore as fincore does."""
    if length is None:
        length = os.fstat(fd).st_size - offset
    if length <= 0:
        return 0
    return check(lib.ufs_cached_pages(fd, offset, length), "mincore")


def aligned(addr: int, length: int, offset: int) -> bool:
    return not (addr % PAGE or length % PAGE or offset % PAGE)


def check_aligned(addr: int, length: int, offset: int, call: str) -> None:
    """Swap I/O moves whole slots: refuse anything else before the kernel
    sees it (with O_DIRECT it would say EINVAL; buffered, it would mix a
    slot's bytes with its neighbour's)."""
    if not aligned(addr, length, offset) or length <= 0:
        raise OSError(errno.EINVAL, f"{call}: buffer {addr:#x}, length {length} and offset "
                      f"{offset} must be multiples of {PAGE}")


def _buffer(addr: int, length: int):
    return ffi.buffer(ffi.cast("char *", addr), length)


def pread(fd: int, addr: int, length: int, offset: int, flags: int = 0) -> int:
    """preadv2 into the memory at addr (aligned); returns bytes read."""
    check_aligned(addr, length, offset, "swap pread")
    try:
        return os.preadv(fd, [_buffer(addr, length)], offset, flags)
    except OSError as e:
        raise_errno(e.errno, "preadv2")


def pwrite(fd: int, addr: int, length: int, offset: int, flags: int = 0) -> int:
    """pwritev2 from the memory at addr (aligned); returns bytes written."""
    check_aligned(addr, length, offset, "swap pwrite")
    try:
        return os.pwritev(fd, [_buffer(addr, length)], offset, flags)
    except OSError as e:
        raise_errno(e.errno, "pwritev2")


def probe(fd: int, addr: int, flags: int) -> int:
    """Read one page at offset 0 with flags: 0, or the -errno the kernel
    answers (EINVAL: no direct I/O here; EOPNOTSUPP: no such RWF flag).
    Reads only: the first slot may hold a journaled page."""
    try:
        os.preadv(fd, [_buffer(addr, PAGE)], 0, flags)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


class AlignedBuffer:
    """Page-aligned memory for direct I/O outside the ring's arena (an
    anonymous mmap: the kernel hands out whole pages)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.map = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = address(self.map)

    def close(self) -> None:
        self.map.close()


def address(buf) -> int:
    """The address of a Python buffer (bytearray, memoryview, mmap)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
