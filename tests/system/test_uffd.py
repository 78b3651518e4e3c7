"""userfaultfd against the real kernel: faults read from the fd and resolved
with batched ZEROPAGE/COPY, write-protect faults, REMOVE events and the
EAGAIN they cause, and the errors the batch helpers report.

Every registered mapping is torn down uffd first: with EVENT_UNMAP granted, a
munmap of a registered range waits until its UNMAP event is read, so closing
the mmap while the uffd is open would hang the test."""
import ctypes
import errno
import os
import select
import struct
import time

import numpy as np
import pytest

from uffdsrv.system import proc, uffd

from .helpers import (
    FEATURES,
    PAGE,
    SERVER,
    WAIT,
    Worker,
    addr_of,
    anon,
    feature_bits,
    features_missing,
    libc,
    pattern,
    read_page,
    root_missing,
    skip_unless_features,
)

pytestmark = pytest.mark.skipif(root_missing() is not None, reason=str(root_missing()))

# What each case needs of the kernel's userfaultfd, after the table of
# tools/testing/selftests/mm/uffd-unit-tests.c: a case's uffd is opened with
# these features and no others, and a kernel that lacks one skips that case
# alone, saying which. Every test of this module is listed
# (test_every_case_lists_its_features keeps it so).
NEEDS = {
    "test_api_grants_required_features": SERVER,
    "test_api_twice_is_refused": (),
    "test_parse_synthetic_messages": (),
    "test_faults_resolved_by_zeropage_and_copy_batches": ("THREAD_ID",),
    "test_eexist_is_reported_and_still_wakes": (),
    "test_copy_multi_page_range_without_faults": (),
    "test_partial_copy_stops_the_batch": (),
    "test_wake_releases_a_thread_after_dontwake_copy": (),
    "test_empty_batches_do_nothing": (),
    "test_misaligned_range_is_einval": (),
    "test_writeprotect_blocks_writer_until_unprotected": ("PAGEFAULT_FLAG_WP",),
    "test_writeprotect_error_names_the_call": ("PAGEFAULT_FLAG_WP",),
    "test_remove_event_blocks_madvise_and_fails_fills_with_eagain": ("EVENT_REMOVE",),
    "test_register_unaligned_range_is_einval": (),
    "test_fill_errors_are_per_entry": (),
    "test_mismatched_batch_arrays_are_refused": (),
    "test_every_case_lists_its_features": (),
    "test_a_missing_feature_skips_only_the_cases_that_need_it": (),
}


@pytest.fixture(autouse=True)
def features(request) -> int:
    """The case's features as UFFDIO_API bits, once the kernel is known to
    have them all."""
    names = NEEDS[request.node.originalname]
    skip_unless_features(names)
    return feature_bits(names)


def test_every_case_lists_its_features():
    cases = {n for n in globals() if n.startswith("test_")}
    assert cases == set(NEEDS), (cases ^ set(NEEDS))


def test_a_missing_feature_skips_only_the_cases_that_need_it():
    every = feature_bits(FEATURES)
    without = every & ~FEATURES["EVENT_REMOVE"]
    skipped = {n: features_missing(f, without) for n, f in NEEDS.items()}
    skipped = {n: why for n, why in skipped.items() if why}
    assert skipped == {
        "test_api_grants_required_features": "the kernel's userfaultfd lacks "
                                             "UFFD_FEATURE_EVENT_REMOVE",
        "test_remove_event_blocks_madvise_and_fails_fills_with_eagain":
            "the kernel's userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE"}
    assert features_missing(("THREAD_ID", "MOVE"), 0) == \
        "the kernel's userfaultfd lacks UFFD_FEATURE_THREAD_ID, UFFD_FEATURE_MOVE"


class Region:
    """An anonymous private mapping registered on a fresh uffd."""

    def __init__(self, npages: int, mode: int = uffd.REGISTER_MODE_MISSING, features: int = 0):
        self.npages = npages
        self.fd = uffd.open_uffd()
        self.map = None
        try:
            self.granted, _ = uffd.api(self.fd, features)
            self.map = anon(npages)
            self.addr = addr_of(self.map)
            self.ioctls = uffd.register(self.fd, self.addr, npages * PAGE, mode)
        except BaseException:
            self.close()
            raise

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def messages(self, want: int, timeout: float = WAIT) -> np.ndarray:
        """Read until `want` messages arrived (or timeout): non-blocking fd,
        poll for readiness."""
        got = []
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0 or not p.poll(int(left * 1000) + 1):
                break
            try:
                buf = os.read(self.fd, uffd.MSG_SIZE * 16)
            except BlockingIOError:
                continue
            assert len(buf) % uffd.MSG_SIZE == 0
            got.extend(uffd.parse(buf, len(buf)).tolist())
        return np.array(got, dtype=uffd.MSG_DTYPE)

    def present(self) -> list[bool]:
        return proc.pagemap_present(os.getpid(), self.addr, self.npages).tolist()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)  # unregisters everything: no UNMAP to wait for
            self.fd = None
        if self.map is not None:
            self.map.close()
            self.map = None


@pytest.fixture
def region(features):
    made = []

    def make(npages, mode=uffd.REGISTER_MODE_MISSING):
        r = Region(npages, mode, features)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def src_buffer(data: bytes):
    """Source pages for UFFDIO_COPY; returned with its address (keep both)."""
    buf = anon(max(1, -(-len(data) // PAGE)))
    buf[: len(data)] = data
    return buf, addr_of(buf)


# --- API -------------------------------------------------------------------

def test_api_grants_required_features(region):
    r = region(1)
    # the answer lists every feature the kernel has: at least those asked
    assert r.granted & uffd.REQUIRED_FEATURES == uffd.REQUIRED_FEATURES
    assert feature_bits(SERVER) == uffd.REQUIRED_FEATURES
    # register answers with the ioctls the range supports: COPY and ZEROPAGE
    # (_UFFDIO_COPY = 0x03, _UFFDIO_ZEROPAGE = 0x04, _UFFDIO_WAKE = 0x02)
    for bit in (0x02, 0x03, 0x04):
        assert r.ioctls & (1 << bit), hex(r.ioctls)


def test_api_twice_is_refused(features):
    fd = uffd.open_uffd()
    try:
        uffd.api(fd, features)
        with pytest.raises(OSError) as e:
            uffd.api(fd, features)
        # the handshake is done once per uffd; the second answer is EINVAL
        assert e.value.errno == errno.EINVAL
        assert "UFFDIO_API" in str(e.value)
    finally:
        os.close(fd)


def test_parse_synthetic_messages():
    buf = (struct.pack("<B3xI QQQ", uffd.EVENT_PAGEFAULT, 0,
                       uffd.PAGEFAULT_FLAG_WRITE | uffd.PAGEFAULT_FLAG_WP,
                       0x7F0000001000, 1234 | (0xDEAD << 32))
           + struct.pack("<B3xI QQQ", uffd.EVENT_REMOVE, 0, 0x10000, 0x13000, 0)
           + struct.pack("<B3xI QQQ", uffd.EVENT_REMAP, 0, 0x1000, 0x9000, 0x2000))
    m = uffd.parse(buf + b"\xff" * 5, len(buf) + 5)  # a trailing fragment is ignored
    assert len(m) == 3
    assert m["event"].tolist() == [uffd.EVENT_PAGEFAULT, uffd.EVENT_REMOVE, uffd.EVENT_REMAP]
    assert int(m[0]["a0"]) == 3 and int(m[0]["a1"]) == 0x7F0000001000
    assert int(m[0]["a2"]) & 0xFFFFFFFF == 1234
    assert (int(m[1]["a0"]), int(m[1]["a1"])) == (0x10000, 0x13000)
    assert (int(m[2]["a0"]), int(m[2]["a1"]), int(m[2]["a2"])) == (0x1000, 0x9000, 0x2000)


# --- faults resolved in batches --------------------------------------------

def test_faults_resolved_by_zeropage_and_copy_batches(region):
    r = region(8)
    # threads fault on pages 0..3 (reads) and page 6 (a write); 4, 5, 7 untouched
    readers = {i: Worker(read_page, r.page(i)) for i in (0, 1, 2, 3)}
    writer = Worker(libc.memset, r.page(6) + 100, 0xAB, 10)
    for w in (*readers.values(), writer):
        w.start()
    msgs = r.messages(5)
    assert len(msgs) == 5, msgs
    assert set(msgs["event"].tolist()) == {uffd.EVENT_PAGEFAULT}
    by_addr = {int(m["a1"]): m for m in msgs}
    assert sorted(by_addr) == [r.page(i) for i in (0, 1, 2, 3, 6)]
    for i, w in readers.items():
        m = by_addr[r.page(i)]
        assert int(m["a0"]) == 0  # a read of a missing page
        assert int(m["a2"]) & 0xFFFFFFFF == w.native_id  # FEATURE_THREAD_ID
    assert int(by_addr[r.page(6)]["a0"]) == uffd.PAGEFAULT_FLAG_WRITE
    assert int(by_addr[r.page(6)]["a2"]) & 0xFFFFFFFF == writer.native_id
    for w in (*readers.values(), writer):
        assert not w.done.is_set(), "a faulting thread ran before its page was resolved"

    # zeropage: pages 0 and 5, one ioctl each, in one call
    n, res = uffd.zeropage(r.fd, [r.page(0), r.page(5)], [PAGE, PAGE])
    assert n == 2 and res.tolist() == [PAGE, PAGE]
    # copy: pages 1..3 as one range of 3 pages, and 6..7 as another
    data = pattern(5 * PAGE, 1)
    src, src_addr = src_buffer(data)
    n, res = uffd.copy(r.fd, [r.page(1), r.page(6)], [src_addr, src_addr + 3 * PAGE],
                       [3 * PAGE, 2 * PAGE])
    assert n == 2 and res.tolist() == [3 * PAGE, 2 * PAGE]

    assert readers[0].finish() == bytes(PAGE)
    for i in (1, 2, 3):
        assert readers[i].finish() == data[(i - 1) * PAGE: i * PAGE]
    writer.finish()
    assert r.present() == [True] * 4 + [False] + [True] * 3
    m = r.map
    assert m[0:PAGE] == bytes(PAGE)
    assert m[PAGE:4 * PAGE] == data[: 3 * PAGE]
    assert m[5 * PAGE:6 * PAGE] == bytes(PAGE)
    want6 = bytearray(data[3 * PAGE:4 * PAGE])
    want6[100:110] = b"\xab" * 10  # the write landed on top of the copied page
    assert m[6 * PAGE:7 * PAGE] == bytes(want6)
    assert m[7 * PAGE:8 * PAGE] == data[4 * PAGE:]
    assert len(r.messages(1, timeout=0.05)) == 0  # nothing else was raised
    src.close()


@pytest.mark.parametrize("op", ["copy", "zeropage"])
def test_eexist_is_reported_and_still_wakes(region, op):
    r = region(2)
    t = Worker(read_page, r.page(1))
    t.start()
    msgs = r.messages(1)
    assert len(msgs) == 1 and int(msgs[0]["a1"]) == r.page(1)
    first, src_addr_first = src_buffer(pattern(PAGE, 7))
    # fill the page without waking the faulting thread
    n, res = uffd.copy(r.fd, [r.page(1)], [src_addr_first], [PAGE], uffd.COPY_MODE_DONTWAKE)
    assert (n, res.tolist()) == (1, [PAGE])
    time.sleep(0.1)
    assert t.is_alive(), "DONTWAKE woke the thread"
    # now a second fill of the same page: EEXIST, and the helper wakes the range;
    # a later entry in the same batch is still tried
    if op == "copy":
        second, src_addr = src_buffer(pattern(PAGE, 9))
        n, res = uffd.copy(r.fd, [r.page(1), r.page(0)], [src_addr, src_addr], [PAGE, PAGE])
    else:
        n, res = uffd.zeropage(r.fd, [r.page(1), r.page(0)], [PAGE, PAGE])
    assert n == 2
    assert res.tolist() == [-errno.EEXIST, PAGE]
    assert t.finish() == pattern(PAGE, 7)  # the first fill won
    assert r.map[PAGE:] == pattern(PAGE, 7)
    first.close()


def test_copy_multi_page_range_without_faults(region):
    r = region(16)
    data = pattern(12 * PAGE, 3)
    src, src_addr = src_buffer(data)
    n, res = uffd.copy(r.fd, [r.page(2)], [src_addr], [12 * PAGE])
    assert (n, res.tolist()) == (1, [12 * PAGE])
    assert r.present() == [False] * 2 + [True] * 12 + [False] * 2
    assert r.map[2 * PAGE:14 * PAGE] == data
    src.close()


def test_partial_copy_stops_the_batch(region):
    r = region(8)
    src, src_addr = src_buffer(pattern(4 * PAGE, 13))
    assert uffd.copy(r.fd, [r.page(1)], [src_addr], [PAGE])[1].tolist() == [PAGE]
    # pages 0..2 where page 1 is already there: the kernel copies page 0, stops
    # at page 1 and answers EAGAIN with copy = 4096; the helper reports the
    # partial count and leaves the rest of the batch (page 5) untried
    n, res = uffd.copy(r.fd, [r.page(0), r.page(5)], [src_addr, src_addr], [3 * PAGE, PAGE])
    assert n == 1 and res.tolist() == [PAGE, 0]
    assert r.present() == [True, True] + [False] * 6
    # the caller retries from where it stopped: the present page is EEXIST
    # (whole entry refused, page 2 still missing), the next entry goes on
    n, res = uffd.copy(r.fd, [r.page(1), r.page(2)], [src_addr, src_addr + 2 * PAGE],
                       [2 * PAGE, PAGE])
    assert n == 2 and res.tolist() == [-errno.EEXIST, PAGE]
    p = pattern(4 * PAGE, 13)
    assert r.map[:3 * PAGE] == p[:PAGE] + p[:PAGE] + p[2 * PAGE:3 * PAGE]
    src.close()


def test_wake_releases_a_thread_after_dontwake_copy(region):
    r = region(1)
    t = Worker(read_page, r.addr)
    t.start()
    assert len(r.messages(1)) == 1
    src, src_addr = src_buffer(pattern(PAGE, 17))
    assert uffd.copy(r.fd, [r.addr], [src_addr], [PAGE], uffd.COPY_MODE_DONTWAKE)[0] == 1
    time.sleep(0.1)
    assert t.is_alive()
    uffd.wake(r.fd, [r.addr], [PAGE])
    assert t.finish() == pattern(PAGE, 17)
    src.close()


def test_empty_batches_do_nothing(region):
    r = region(1)
    for n, res in (uffd.copy(r.fd, [], [], []), uffd.zeropage(r.fd, [], [])):
        assert n == 0 and res.tolist() == []
    uffd.writeprotect(r.fd, [], [], True)
    uffd.wake(r.fd, [], [])
    assert r.present() == [False]


# (call, arguments past the fd) -> EINVAL for a misaligned range, with the
# call's name in the message
MISALIGNED = [
    ("UFFDIO_WAKE", lambda fd, a: uffd.wake(fd, [a + 1], [PAGE])),
    ("UFFDIO_UNREGISTER", lambda fd, a: uffd.unregister(fd, a + 1, PAGE)),
    ("UFFDIO_REGISTER", lambda fd, a: uffd.register(fd, a, PAGE + 1,
                                                    uffd.REGISTER_MODE_MISSING)),
]


@pytest.mark.parametrize("call,fn", MISALIGNED, ids=[m[0] for m in MISALIGNED])
def test_misaligned_range_is_einval(region, call, fn):
    r = region(2)
    with pytest.raises(OSError) as e:
        fn(r.fd, r.addr)
    assert e.value.errno == errno.EINVAL
    assert e.value.strerror == f"{call}: {os.strerror(errno.EINVAL)}"


# --- write-protect ------------------------------------------------------------

def test_writeprotect_blocks_writer_until_unprotected(region):
    r = region(4, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_WP)
    data = pattern(4 * PAGE, 5)
    src, src_addr = src_buffer(data)
    assert uffd.copy(r.fd, [r.addr], [src_addr], [4 * PAGE])[1].tolist() == [4 * PAGE]
    uffd.writeprotect(r.fd, [r.page(1)], [2 * PAGE], True)

    w = Worker(libc.memset, r.page(2) + 8, 0xEE, 16)
    w.start()
    time.sleep(0.1)
    assert w.is_alive(), "a write to a protected page went through"
    msgs = r.messages(1)
    assert len(msgs) == 1
    assert int(msgs[0]["event"]) == uffd.EVENT_PAGEFAULT
    assert int(msgs[0]["a0"]) == uffd.PAGEFAULT_FLAG_WP | uffd.PAGEFAULT_FLAG_WRITE
    assert int(msgs[0]["a1"]) == r.page(2)
    assert r.map[2 * PAGE:3 * PAGE] == data[2 * PAGE:3 * PAGE]  # not written yet
    uffd.writeprotect(r.fd, [r.page(1)], [2 * PAGE], False)  # also wakes
    w.finish()
    want = bytearray(data)
    want[2 * PAGE + 8:2 * PAGE + 24] = b"\xee" * 16
    assert r.map[:] == bytes(want)
    src.close()


def test_writeprotect_error_names_the_call(region):
    r = region(2)  # registered MISSING only: protecting is refused
    with pytest.raises(OSError) as e:
        uffd.writeprotect(r.fd, [r.addr], [PAGE], True)
    # observed: ENOENT, the range has no VM_UFFD_WP vma
    assert e.value.errno == errno.ENOENT
    assert "UFFDIO_WRITEPROTECT" in str(e.value)


# --- REMOVE and EAGAIN ------------------------------------------------------

def test_remove_event_blocks_madvise_and_fails_fills_with_eagain(region):
    r = region(8)
    data = pattern(8 * PAGE, 11)
    src, src_addr = src_buffer(data)
    assert uffd.copy(r.fd, [r.addr], [src_addr], [8 * PAGE])[1].tolist() == [8 * PAGE]

    def dontneed():
        ret = libc.madvise(r.page(2), 3 * PAGE, proc.MADV_DONTNEED)
        return ret, ctypes.get_errno()

    z = Worker(dontneed)
    z.start()
    time.sleep(0.1)
    assert z.is_alive(), "madvise returned before its REMOVE was read"
    # the event is unread: every fill is refused with EAGAIN and the batch stops
    n, res = uffd.zeropage(r.fd, [r.page(2), r.page(3), r.page(4)], [PAGE] * 3)
    assert n == 1 and res.tolist() == [-errno.EAGAIN, 0, 0]
    n, res = uffd.copy(r.fd, [r.page(2), r.page(3)], [src_addr, src_addr], [PAGE, PAGE])
    assert n == 1 and res.tolist() == [-errno.EAGAIN, 0]
    assert z.is_alive()

    raw = os.read(r.fd, uffd.MSG_SIZE * 4)
    assert len(raw) == uffd.MSG_SIZE
    m = uffd.parse(raw, len(raw))
    assert int(m[0]["event"]) == uffd.EVENT_REMOVE
    assert (int(m[0]["a0"]), int(m[0]["a1"])) == (r.page(2), r.page(5))
    assert z.finish() == (0, 0)
    assert r.present() == [True, True, False, False, False, True, True, True]
    # the zapping thread has run again: fills work, the range reads zeros
    n, res = uffd.zeropage(r.fd, [r.page(2)], [3 * PAGE])
    assert (n, res.tolist()) == (1, [3 * PAGE])
    assert r.map[:] == data[: 2 * PAGE] + bytes(3 * PAGE) + data[5 * PAGE:]
    src.close()


# --- errors -------------------------------------------------------------------

def test_register_unaligned_range_is_einval(region, features):
    r = region(2)
    fd = uffd.open_uffd()
    other = anon(2)
    try:
        uffd.api(fd, features)
        with pytest.raises(OSError) as e:
            uffd.register(fd, addr_of(other) + 1, PAGE, uffd.REGISTER_MODE_MISSING)
        assert e.value.errno == errno.EINVAL
        assert "UFFDIO_REGISTER" in str(e.value)
        # a range already registered on another uffd is busy
        with pytest.raises(OSError) as e:
            uffd.register(fd, r.addr, PAGE, uffd.REGISTER_MODE_MISSING)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)
        other.close()


# (description, dst relative to the registered page, length) -> -errno.
# ENOENT: the kernel finds no vma registered on this uffd at dst (plain
# mapped memory, or nothing mapped); EINVAL: dst or len not page aligned, or
# len 0 (checked before any vma lookup).
FILL_ERRORS = [
    ("unregistered mapping", "other", PAGE, errno.ENOENT),
    ("unaligned dst", 1, PAGE, errno.EINVAL),
    ("unaligned len", 0, 100, errno.EINVAL),
    ("zero len", 0, 0, errno.EINVAL),
    ("past the registered range", PAGE, PAGE, errno.ENOENT),
]


@pytest.mark.parametrize("op", ["copy", "zeropage"])
@pytest.mark.parametrize("what,dst,length,err", FILL_ERRORS, ids=[e[0] for e in FILL_ERRORS])
def test_fill_errors_are_per_entry(region, op, what, dst, length, err):
    r = region(1)
    other = anon(1)
    src, src_addr = src_buffer(pattern(PAGE, 2))
    # the registered page must not be in the way: a spare page sits after it
    bad = addr_of(other) if dst == "other" else r.addr + dst
    if what == "past the registered range":
        bad = r.addr + PAGE
    try:
        if op == "copy":
            n, res = uffd.copy(r.fd, [bad, r.addr], [src_addr, src_addr], [length, PAGE])
        else:
            n, res = uffd.zeropage(r.fd, [bad, r.addr], [length, PAGE])
        # not EAGAIN: the batch goes on to the next entry, which succeeds
        assert n == 2
        assert res.tolist() == [-err, PAGE]
        if op == "copy":
            assert r.map[:] == pattern(PAGE, 2)
        else:
            assert r.map[:] == bytes(PAGE)
        assert other[:] == bytes(PAGE)
    finally:
        other.close()
        src.close()


# --- once bugs, now fixed: they must stay fixed ----------------------------------

@pytest.mark.parametrize("op", ["copy", "zeropage"])
def test_mismatched_batch_arrays_are_refused(region, op):
    r = region(2)
    src, src_addr = src_buffer(pattern(PAGE, 19))
    try:
        with pytest.raises(ValueError):
            if op == "copy":
                uffd.copy(r.fd, [r.page(0), r.page(1)], [src_addr], [PAGE, PAGE])
            else:
                uffd.zeropage(r.fd, [r.page(0), r.page(1)], [PAGE])
    finally:
        src.close()
