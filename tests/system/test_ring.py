"""io_uring through Ring against the real kernel: fixed (registered arena)
and plain buffers, vectored I/O, reads that complete later, cancellation,
errors in completions, batched submission, and the asyncio (uvloop) path.

Tests that wait for a completion wait on the ring's eventfd with a timeout
(never io_uring_wait_cqe, which has none), so a lost completion fails the
test instead of hanging it."""
import asyncio
import errno
import os
import tempfile
import time

import pytest
from uffdsrv._native import ffi, lib

from uffdsrv.system.ring import Ring

from .helpers import PAGE, WAIT, addr_of, pattern, readable, root_missing

pytestmark = pytest.mark.skipif(root_missing() is not None, reason=str(root_missing()))

ARENA = 1 << 20


@pytest.fixture(params=[False, True], ids=["plain", "registered"])
def ring(request):
    """Every ring test with the arena unregistered (the default) and
    registered (READ_FIXED/WRITE_FIXED)."""
    r = Ring(64, ARENA, register=request.param)
    yield r
    r.close()


@pytest.fixture
def tmpfd():
    fd, path = tempfile.mkstemp(prefix="uffdsrv-ring-")
    os.unlink(path)
    yield fd
    os.close(fd)


@pytest.fixture
def pipe():
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield rfd, wfd
    os.close(rfd)
    os.close(wfd)


class Results:
    """Callbacks that record (tag, res) in completion order."""

    def __init__(self):
        self.got = {}

    def cb(self, tag):
        def done(res):
            assert tag not in self.got, f"callback {tag} ran twice"
            self.got[tag] = res
        return done


def complete(ring: Ring, results: Results, want: int, timeout: float = WAIT):
    """Submit, then harvest until `want` callbacks have run."""
    ring.flush()
    deadline = time.monotonic() + timeout
    while len(results.got) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(results.got)} of {want} completions: {results.got}"
        if readable(ring.eventfd, left):
            ring.harvest()


# --- read / write --------------------------------------------------------------

# where the buffers live: the arena takes READ_FIXED/WRITE_FIXED, a
# bytearray the plain opcodes
PATHS = ["arena", "plain"]


def buffers(ring: Ring, where: str, n: int):
    """Two n-byte buffers (source, destination): their addresses and a reader."""
    if where == "arena":
        a, b = ring.arena_addr + PAGE, ring.arena_addr + 5 * PAGE
        return a, b, lambda addr: ring.arena[addr - ring.arena_addr:][:n], None
    keep = bytearray(2 * n)
    base = addr_of(keep)
    return base, base + n, lambda addr: bytes(keep[addr - base:][:n]), keep


@pytest.mark.parametrize("where", PATHS)
def test_write_then_read_round_trip(ring, tmpfd, where):
    n = 3 * PAGE + 123
    data = pattern(n, 4)
    src, dst, view, keep = buffers(ring, where, n)
    ffi.memmove(ffi.cast("char *", src), data, n)
    res = Results()
    ring.write(tmpfd, src, n, 4096, res.cb("w"))
    complete(ring, res, 1)
    assert res.got == {"w": n}
    assert os.pread(tmpfd, n + 10, 4096) == data  # at the offset, nothing more
    ring.read(tmpfd, dst, n, 4096, res.cb("r"))
    complete(ring, res, 2)
    assert res.got["r"] == n
    assert view(dst) == data
    del keep


def test_fixed_prep_refuses_a_buffer_outside_the_arena(ring, tmpfd):
    outside = bytearray(PAGE)
    addr = ffi.cast("void *", addr_of(outside))
    assert lib.ufs_ring_read_fixed(ring._r, tmpfd, addr, PAGE, 0, 1) == -errno.EFAULT
    end = ffi.cast("void *", ring.arena_addr + ARENA - 100)
    assert lib.ufs_ring_write_fixed(ring._r, tmpfd, end, 200, 0, 1) == -errno.EFAULT
    assert lib.ufs_ring_pending(ring._r) == 0  # nothing was queued


def test_buffer_straddling_arena_end_takes_plain_path(ring, tmpfd):
    # a 200-byte read at the last 100 bytes of the arena: as READ_FIXED the
    # prep refuses it (EFAULT, raised); as a plain read it succeeds, and since
    # the file holds only 100 bytes nothing past the arena is written
    os.pwrite(tmpfd, b"\x5a" * 100, 0)
    res = Results()
    ring.read(tmpfd, ring.arena_addr + ARENA - 100, 200, 0, res.cb("r"))
    complete(ring, res, 1)
    assert res.got == {"r": 100}
    assert ring.arena[ARENA - 100:] == b"\x5a" * 100


def test_writev_readv_several_buffers(ring, tmpfd):
    sizes = [100, PAGE, 3 * PAGE + 1, 7]
    chunks = [pattern(s, i + 20) for i, s in enumerate(sizes)]
    srcs = [bytearray(c) for c in chunks]
    dsts = [bytearray(s) for s in sizes]
    res = Results()
    ring.writev(tmpfd, [addr_of(b) for b in srcs], sizes, 512, res.cb("wv"))
    complete(ring, res, 1)
    assert res.got["wv"] == sum(sizes)
    assert os.pread(tmpfd, sum(sizes) + 1, 512) == b"".join(chunks)
    # readv splits one file range back into the buffers, in order
    ring.readv(tmpfd, [addr_of(b) for b in dsts], sizes, 512, res.cb("rv"))
    complete(ring, res, 2)
    assert res.got["rv"] == sum(sizes)
    assert [bytes(b) for b in dsts] == chunks


def test_readv_of_too_many_vectors_is_refused(ring, tmpfd):
    bufs = [0x1000] * 1025  # over UIO_MAXIOV
    with pytest.raises(OSError) as e:
        ring.readv(tmpfd, bufs, [1] * 1025, 0, lambda res: None)
    assert e.value.errno == errno.EINVAL
    assert "io_uring readv" in str(e.value)


# --- completions that come later ----------------------------------------------

def test_pipe_read_completes_when_data_arrives(ring, pipe):
    rfd, wfd = pipe
    res = Results()
    ring.read(rfd, ring.arena_addr, 64, 0, res.cb("r"))
    ring.flush()
    assert ring.harvest() == 0
    assert not readable(ring.eventfd, 0.1)  # nothing posted: the read is parked
    assert ring.harvest() == 0 and res.got == {}
    os.write(wfd, b"late data")
    complete(ring, res, 1)
    assert res.got == {"r": 9}
    assert ring.arena[:9] == b"late data"


def test_eventfd_read_completes_when_signalled(ring):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        res = Results()
        ring.read(efd, ring.arena_addr, 8, 0, res.cb("e"))
        ring.flush()
        assert not readable(ring.eventfd, 0.1)
        assert ring.harvest() == 0 and res.got == {}
        os.eventfd_write(efd, 0x0102030405)
        complete(ring, res, 1)
        assert res.got == {"e": 8}
        assert ring.arena[:8] == (0x0102030405).to_bytes(8, "little")
    finally:
        os.close(efd)


def test_cancel_pending_read_gives_ecanceled(ring, pipe):
    rfd, wfd = pipe
    res = Results()
    ud = ring.read(rfd, ring.arena_addr, 64, 0, res.cb("r"))
    ring.flush()
    assert not readable(ring.eventfd, 0.05)
    ring.cancel(ud)
    complete(ring, res, 1)
    assert res.got == {"r": -errno.ECANCELED}
    # the pipe's data is not consumed by a cancelled read
    os.write(wfd, b"x")
    assert os.read(rfd, 10) == b"x"


def test_cancel_unknown_user_data_queues_nothing(ring):
    ring.cancel(123456)
    assert lib.ufs_ring_pending(ring._r) == 0


# (name, fd maker, op, -errno in the callback)
def _closed_fd():
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd, None


def _wronly_fd():
    fd = os.open("/dev/null", os.O_WRONLY)
    return fd, fd


def _rdonly_fd():
    fd = os.open("/dev/null", os.O_RDONLY)
    return fd, fd


ERRORS = [
    ("read closed fd", _closed_fd, "read", errno.EBADF),
    ("read huge fd", lambda: (1 << 20, None), "read", errno.EBADF),
    ("read write-only fd", _wronly_fd, "read", errno.EBADF),
    ("write read-only fd", _rdonly_fd, "write", errno.EBADF),
]


@pytest.mark.parametrize("name,make,op,err", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_reaches_callback(ring, name, make, op, err):
    fd, to_close = make()
    try:
        res = Results()
        getattr(ring, op)(fd, ring.arena_addr, 16, 0, res.cb(op))
        complete(ring, res, 1)
        assert res.got == {op: -err}
    finally:
        if to_close is not None:
            os.close(to_close)


# --- batching -------------------------------------------------------------------

def test_flush_submits_queued_writes_in_one_call(ring, tmpfd):
    res = Results()
    for i in range(10):
        ring.arena[i * 16:(i + 1) * 16] = bytes([i + 1]) * 16
        ring.write(tmpfd, ring.arena_addr + i * 16, 16, i * 16, res.cb(i))
    assert lib.ufs_ring_pending(ring._r) == 10
    assert (ring.submissions, ring.entries_submitted) == (0, 0)  # nothing until flush
    ring.flush()
    assert (ring.submissions, ring.entries_submitted) == (1, 10)
    ring.flush()  # nothing pending: no submission counted
    assert (ring.submissions, ring.entries_submitted) == (1, 10)
    complete(ring, res, 10)
    assert res.got == {i: 16 for i in range(10)}
    assert os.pread(tmpfd, 200, 0) == b"".join(bytes([i + 1]) * 16 for i in range(10))


# --- asyncio ---------------------------------------------------------------------

def test_read_async_on_uvloop_resolves_through_the_eventfd(tmpfd):
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    ring = Ring(64, ARENA)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ring.attach(loop)

        async def main():
            fut = ring.read_async(rfd, ring.arena_addr, 32, 0)
            await asyncio.sleep(0.05)  # the flush ran, the read is parked
            assert ring.submissions == 1 and not fut.done()
            loop.call_later(0.02, os.write, wfd, b"from the pipe")
            got = await asyncio.wait_for(fut, WAIT)
            ring.arena[PAGE:PAGE + 5] = b"async"
            wrote = await asyncio.wait_for(ring.write_async(tmpfd, ring.arena_addr + PAGE, 5,
                                                            0), WAIT)
            return got, wrote

        got, wrote = loop.run_until_complete(asyncio.wait_for(main(), 2 * WAIT))
        assert got == len(b"from the pipe")
        assert ring.arena[:got] == b"from the pipe"
        assert wrote == 5 and os.pread(tmpfd, 10, 0) == b"async"
        assert ring.submissions == 2 and ring.entries_submitted == 2
    finally:
        ring.close()
        loop.close()
        os.close(rfd)
        os.close(wfd)


# --- a uffd read through the ring ------------------------------------------------

def test_ring_reads_uffd_messages_when_a_fault_arrives(ring):
    from uffdsrv.system import uffd

    from .helpers import Worker, anon, feature_bits, read_page, skip_unless_features

    needs = ("THREAD_ID",)  # the message names the faulting thread
    skip_unless_features(needs)
    fd = uffd.open_uffd()
    m = anon(2)
    try:
        uffd.api(fd, feature_bits(needs))
        addr = addr_of(m)
        uffd.register(fd, addr, 2 * PAGE, uffd.REGISTER_MODE_MISSING)
        res = Results()
        ring.read(fd, ring.arena_addr, 4 * uffd.MSG_SIZE, 0, res.cb("u"))
        ring.flush()
        assert not readable(ring.eventfd, 0.05) and ring.harvest() == 0
        t = Worker(read_page, addr + PAGE)
        t.start()
        complete(ring, res, 1)
        assert res.got == {"u": uffd.MSG_SIZE}
        msg = uffd.parse(ring.arena, uffd.MSG_SIZE)[0]
        assert int(msg["event"]) == uffd.EVENT_PAGEFAULT
        assert int(msg["a1"]) == addr + PAGE
        assert int(msg["a2"]) & 0xFFFFFFFF == t.native_id
        n, r = uffd.zeropage(fd, [addr + PAGE], [PAGE])
        assert (n, r.tolist()) == (1, [PAGE])
        assert t.finish() == bytes(PAGE)
    finally:
        os.close(fd)
        m.close()


# --- once bugs, now fixed: they must stay fixed ----------------------------------

def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_arena_registration_leaks_nothing():
    before = _nfds()
    with pytest.raises(OSError) as e:
        Ring(8, (1 << 30) + PAGE, register=True)  # over io_uring's 1 GiB per registered buffer
    assert e.value.errno == errno.EFAULT and "io_uring_register_buffers" in str(e.value)
    assert _nfds() == before


def test_close_twice_leaves_other_fds_alone():
    r = Ring(8, 1 << 16)
    old = r.eventfd
    r.close()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    try:
        assert old in fds  # the number was reused
        r.close()
        for fd in fds:
            os.fstat(fd)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def test_raising_callback_does_not_lose_other_completions(ring, tmpfd):
    res = Results()

    def bad(_res):
        raise RuntimeError("callback failed")

    ring.write(tmpfd, ring.arena_addr, 16, 0, bad)
    ring.write(tmpfd, ring.arena_addr, 16, 16, res.cb("second"))
    ring.flush()
    assert readable(ring.eventfd, WAIT)
    time.sleep(0.02)  # both completions posted
    ring.harvest()  # the failure is logged; the other completion still runs
    assert res.got == {"second": 16}


def test_refused_prep_keeps_no_callback(ring, tmpfd):
    with pytest.raises(OSError):
        ring.readv(tmpfd, [ring.arena_addr] * 1025, [1] * 1025, 0, lambda res: None)
    assert ring._callbacks == {}


def test_counters_include_submissions_made_when_the_sq_is_full(tmpfd):
    ring = Ring(4, 1 << 16)
    try:
        res = Results()
        for i in range(10):
            ring.write(tmpfd, ring.arena_addr, 16, i * 16, res.cb(i))
        ring.flush()
        complete(ring, res, 10)
        assert res.got == {i: 16 for i in range(10)}  # every write completed
        assert ring.entries_submitted == 10
        assert ring.submissions == 3
    finally:
        ring.close()


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("register", [False, True])
def test_an_arena_costs_memory_only_where_used_unless_registered(register, tmpfd):
    """Registering pins (so faults in) the whole arena at once; an
    unregistered one holds only the pages I/O touched, and discard gives
    those back. The server's RSS counts against a budget's memory."""
    n = 64 << 20
    base = _rss_anon()
    r = Ring(8, n, register=register)
    try:
        grown = _rss_anon() - base
        if register:
            assert grown >= n * 9 // 10
            return
        assert grown < 4 << 20
        os.ftruncate(tmpfd, 16 * PAGE)
        res = Results()
        r.read(tmpfd, r.arena_addr, 16 * PAGE, 0, res.cb("r"))
        r.flush()
        complete(r, res, 1)
        assert res.got == {"r": 16 * PAGE}
        r.arena[:16 * PAGE] = b"\x5a" * (16 * PAGE)
        used = _rss_anon() - base
        assert 16 * PAGE <= used < (4 << 20) + 16 * PAGE
        r.discard(r.arena_addr, 16 * PAGE)
        assert r.arena[:PAGE] == bytes(PAGE)  # given back: zeros when touched again
        assert _rss_anon() - base < used
    finally:
        r.close()
