"""The swap device against the real kernel: the swap file's fd really has
O_DIRECT; where direct I/O means nothing (tmpfs) the fallback is named;
each mode leaves no page of the file in the page cache (counted with
mincore, as fincore does, so a cached page cannot hide); fallocate really
allocated the blocks (st_blocks); unaligned I/O is refused, not done
halfway; ring reads and writes carry their rw_flags to the kernel; and a
block device (a loop device, as root) is used whole, direct.

Files live under pytest's tmp_path (the disk: ext4 here) or /dev/shm
(tmpfs), and are removed with it."""
import errno
import logging
import os
import shutil
import subprocess
import time

import pytest

from uffdsrv.core.pages import PAGE
from uffdsrv.server.swap import SwapError, SwapFile
from uffdsrv.system import swapdev
from uffdsrv.system.ring import Ring

from .helpers import WAIT, pattern, readable

MIB = 1 << 20
SIZE = 8 * MIB


def fdinfo_flags(fd: int) -> int:
    for line in open(f"/proc/self/fdinfo/{fd}"):
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def cached_after(fd: int, want: int = 0, timeout: float = 2.0) -> int:
    """Cached pages of the file, waiting up to timeout for them to reach
    `want`: a RWF_DONTCACHE write drops its pages when writeback completes,
    a few ms after the write returned."""
    deadline = time.monotonic() + timeout
    while True:
        n = swapdev.cached_pages(fd)
        if n <= want or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


@pytest.fixture
def swap(tmp_path):
    made = []

    def make(io_mode=None, path=None, size=SIZE):
        s = SwapFile(str(path or tmp_path / f"swap{len(made)}"), size, io_mode)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.fixture
def shm():
    if not os.path.isdir("/dev/shm") or os.statvfs("/dev/shm").f_bavail * 4096 < 4 * SIZE:
        pytest.skip("no /dev/shm with room for a test file")
    path = f"/dev/shm/uffdsrv-test-{os.getpid()}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def forced(swap, mode):
    try:
        return swap(mode)
    except SwapError as e:
        pytest.skip(f"this filesystem cannot do {mode} I/O: {e}")


def test_swap_file_fd_has_o_direct(swap):
    s = forced(swap, "direct")
    flags = fdinfo_flags(s.fd)
    assert flags & os.O_DIRECT, oct(flags)
    assert s.io_mode == "direct" and s.rw_flags == 0
    # the default picks it too, on this disk
    assert swap().io_mode == "direct"
    # and a forced fallback really runs without it
    b = swap("buffered")
    assert not fdinfo_flags(b.fd) & os.O_DIRECT and b.io_mode == "buffered"


def test_fallocate_allocated_every_block(swap, tmp_path):
    s = swap(size=SIZE)
    st = os.fstat(s.fd)
    assert st.st_size == SIZE == s.size
    assert st.st_blocks * 512 >= SIZE, st.st_blocks  # not sparse
    assert s.preallocated


def test_existing_file_is_never_shrunk_and_keeps_its_slots(swap, tmp_path):
    path = tmp_path / "old"
    data = pattern(2 * PAGE, 3)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, data, 5 * PAGE)            # a journaled slot of an earlier run
    os.ftruncate(fd, 2 * SIZE)               # sparse, bigger than asked for
    os.close(fd)
    s = swap(path=path, size=SIZE)
    st = os.fstat(s.fd)
    assert s.size == st.st_size == 2 * SIZE
    assert st.st_blocks * 512 >= 2 * SIZE    # the holes are allocated now
    back = bytearray(2 * PAGE)
    assert s.pread(back, 5 * PAGE) == 2 * PAGE and bytes(back) == data


def test_without_fallocate_new_blocks_are_zero_filled(swap, tmp_path, monkeypatch, caplog):
    path = tmp_path / "nofalloc"
    data = pattern(PAGE, 9)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, data, 0)
    os.close(fd)

    def refuse(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "fallocate: Operation not supported")
    monkeypatch.setattr(swapdev, "allocate", refuse)
    with caplog.at_level(logging.WARNING, "uffdsrv.swap"):
        s = swap(path=path, size=SIZE)
    assert "cannot fallocate" in caplog.text
    st = os.fstat(s.fd)
    assert st.st_blocks * 512 >= SIZE and s.preallocated
    back = bytearray(SIZE)
    assert s.pread(back, 0) == SIZE
    assert bytes(back[:PAGE]) == data        # what was there stays
    assert back.count(0) == SIZE - PAGE      # the rest reads as zeros
    assert cached_after(s.fd) == 0           # zero-filling cached nothing


def test_tmpfs_names_the_fallback_and_says_it_frees_nothing(swap, shm, caplog):
    with caplog.at_level(logging.WARNING, "uffdsrv.swap"):
        s = swap(path=shm)
    assert s.io_mode in ("dontcache", "buffered"), s.io_mode
    assert not fdinfo_flags(s.fd) & os.O_DIRECT
    assert swapdev.memory_fs(s.fd) == "tmpfs"
    assert "tmpfs" in caplog.text and "frees none" in caplog.text
    # why: on tmpfs the cached pages are the file itself (the kernel's
    # O_DIRECT there, accepted since 6.6, copies through them too)
    data = pattern(4 * PAGE, 5)
    assert s.pwrite(data, 0) == len(data)
    assert swapdev.cached_pages(s.fd, 0, 4 * PAGE) == 4
    assert os.fstat(s.fd).st_blocks == 8 * 4  # no preallocation: that would pin RAM


# --- no page cache behind, in every mode ------------------------------------------
def ring_io(ring: Ring, s: SwapFile, write: bool, addr: int, length: int, offset: int) -> int:
    got = []
    op = ring.write if write else ring.read
    op(s.fd, addr, length, offset, got.append, s.rw_flags)
    ring.flush()
    deadline = time.monotonic() + WAIT
    while not got:
        left = deadline - time.monotonic()
        assert left > 0, "no completion"
        if readable(ring.eventfd, left):
            ring.harvest()
    if got[0] > 0:
        (s.written if write else s.was_read)(offset, got[0])
    return got[0]


@pytest.mark.parametrize("mode", ["direct", "dontcache", "buffered"])
def test_mode_leaves_no_page_cache(swap, mode):
    s = forced(swap, mode)
    n = 256 * PAGE
    ring = Ring(64, 2 * n)
    try:
        data = pattern(n, 11)
        ring.arena[:n] = data
        for rnd in range(2):  # a fresh file, then overwrites (a reused one)
            for k in range(4):  # 4 MiB in runs, as reclaim writes them
                assert ring_io(ring, s, True, ring.arena_addr, n, k * n) == n
            assert cached_after(s.fd) == 0, f"round {rnd}"
        for k in range(4):
            ring.arena[n:2 * n] = bytes(n)
            assert ring_io(ring, s, False, ring.arena_addr + n, n, k * n) == n
            assert ring.arena[n:2 * n] == data
        assert cached_after(s.fd) == 0
        # synchronous I/O (the restore path) too, with a buffer that is not aligned
        odd = bytearray(2 * PAGE + 1)
        assert s.pread(memoryview(odd)[1:], 3 * PAGE) == 2 * PAGE
        assert bytes(odd[1:]) == data[3 * PAGE:5 * PAGE]
        assert cached_after(s.fd) == 0
    finally:
        ring.close()


def test_mincore_sees_a_plain_buffered_write(tmp_path):
    # the control for the test above: the count is not always 0
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, pattern(16 * PAGE, 1), 0)
        assert swapdev.cached_pages(fd) == 16
        swapdev.sync_range(fd, 0, 16 * PAGE)
        swapdev.drop_cache(fd, 0, 16 * PAGE)
        assert swapdev.cached_pages(fd) == 0
    finally:
        os.close(fd)


# --- alignment ------------------------------------------------------------------
@pytest.mark.parametrize("length, offset", [(PAGE, 100), (1000, 0), (PAGE + 512, PAGE), (0, 0)])
def test_unaligned_swap_io_is_refused(swap, length, offset):
    s = swap()
    data = pattern(2 * PAGE, 2)
    assert s.pwrite(data, 0) == 2 * PAGE
    for op, call in ((s.pwrite, "swap pwrite"), (s.pread, "swap pread")):
        with pytest.raises(OSError) as e:
            op(bytearray(length), offset)
        assert e.value.errno == errno.EINVAL and call in str(e.value)
    back = bytearray(2 * PAGE)
    s.pread(back, 0)
    assert bytes(back) == data  # nothing was written halfway


def test_direct_fd_refuses_what_is_not_aligned(swap):
    s = forced(swap, "direct")
    data = pattern(PAGE, 6)
    assert s.pwrite(data, PAGE) == PAGE
    # a bytes object is not page-aligned: the kernel refuses it whole
    with pytest.raises(OSError) as e:
        os.pwrite(s.fd, b"\xff" * PAGE + b"\xee", PAGE)
    assert e.value.errno == errno.EINVAL
    ring = Ring(8, 4 * PAGE)
    try:
        ring.arena[:PAGE] = b"\xff" * PAGE
        assert ring_io(ring, s, True, ring.arena_addr, PAGE, PAGE + 100) == -errno.EINVAL
        assert ring_io(ring, s, True, ring.arena_addr, 100, PAGE) == -errno.EINVAL
    finally:
        ring.close()
    back = bytearray(PAGE)
    s.pread(back, PAGE)
    assert bytes(back) == data


def test_ring_carries_rw_flags_to_the_kernel(swap):
    s = swap()
    ring = Ring(8, 4 * PAGE)
    try:
        got = []
        # a flag no kernel knows: refused in the completion, so it reached it
        ring.read(s.fd, ring.arena_addr, PAGE, 0, got.append, flags=1 << 30)
        ring.write(s.fd, ring.arena_addr, PAGE, 0, got.append, flags=1 << 30)
        outside = bytearray(PAGE)  # not in the arena: the plain opcodes
        ring.read(s.fd, swapdev.address(outside), PAGE, 0, got.append, flags=1 << 30)
        ring.flush()
        deadline = time.monotonic() + WAIT
        while len(got) < 3 and time.monotonic() < deadline:
            if readable(ring.eventfd, 0.1):
                ring.harvest()
        assert got == [-errno.EOPNOTSUPP] * 3, got
    finally:
        ring.close()


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("a loop device needs root and losetup")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_goes_direct(loop_device):
    s = SwapFile(loop_device, 4 * SIZE)  # asks for more than the device has
    try:
        assert s.io_mode == "direct" and fdinfo_flags(s.fd) & os.O_DIRECT
        assert s.size == SIZE and s.slots.nslots == SIZE // PAGE
        assert not s.preallocated  # a device has its blocks already
        data = pattern(4 * PAGE, 8)
        assert s.pwrite(data, SIZE - 4 * PAGE) == len(data)
        back = bytearray(len(data))
        assert s.pread(back, SIZE - 4 * PAGE) == len(data) and bytes(back) == data
        assert swapdev.cached_pages(s.fd, 0, SIZE) == 0
    finally:
        s.close()


# --- the file's own checks ---------------------------------------------------------
def test_swap_file_checks(tmp_path):
    with pytest.raises(SwapError):
        SwapFile(str(tmp_path / "tiny"), PAGE)
    with pytest.raises(SwapError):
        SwapFile(str(tmp_path / "x"), SIZE, "fast")
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(SwapError):
        SwapFile(str(tmp_path / "link"), SIZE)
    open_to_all = tmp_path / "open"
    open_to_all.write_bytes(b"")
    os.chmod(open_to_all, 0o666)
    with pytest.raises(SwapError):
        SwapFile(str(open_to_all), SIZE)
    s = SwapFile(str(tmp_path / "new"), SIZE)
    try:
        assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o600
    finally:
        s.close()

