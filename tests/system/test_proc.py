"""Other processes, against the real kernel: pidfds, taking a child's fd,
process_madvise on another process and on ourselves (PIDFD_SELF), reading a
child's memory, and the small /proc readers.

Children are forked (not exec'd) so a mapping made before the fork sits at
the same address in both; they talk over pipes and always end in os._exit.
No uffd is open here: with EVENT_FORK, a fork would wait on it."""
import errno
import os
import platform
import select
import socket
import threading

import numpy as np
import pytest

from uffdsrv.system import proc, procfs

from .helpers import PAGE, WAIT, addr_of, anon, kernel_version, pattern, readable, root_missing

pytestmark = pytest.mark.skipif(root_missing() is not None, reason=str(root_missing()))

PIDFD_SELF = -10000


class Child:
    """A forked child running fn(report_fd); the parent reads its report line
    and can release it (it then exits with status 0)."""

    def __init__(self, fn):
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(rep_r)
                os.close(go_w)
                fn(rep_w)
                os.close(rep_w)
                os.read(go_r, 1)  # until the parent releases us (or dies)
                code = 0
            finally:
                os._exit(code)
        os.close(rep_w)
        os.close(go_r)
        self.pid, self._rep, self._go = pid, rep_r, go_w
        self.status = None

    def report(self) -> bytes:
        assert readable(self._rep, WAIT), "child did not report"
        return os.read(self._rep, 4096)

    def release(self) -> int:
        if self._go is not None:
            os.close(self._go)
            os.close(self._rep)
            self._go = None
        if self.status is None:
            for _ in range(int(WAIT * 100)):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = os.waitstatus_to_exitcode(status)
                    break
                select.select([], [], [], 0.01)
            else:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                raise AssertionError("child did not exit")
        return self.status


@pytest.fixture
def child():
    made = []

    def make(fn=lambda fd: os.write(fd, b"up")):
        c = Child(fn)
        made.append(c)
        return c
    yield make
    for c in made:
        c.release()


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --- pidfds ---------------------------------------------------------------------

def test_pidfd_open_follows_the_child(child):
    c = child()
    assert c.report() == b"up"
    pidfd = proc.pidfd_open(c.pid)
    try:
        assert not readable(pidfd, 0.05)  # alive: not readable
        assert c.release() == 0
        assert readable(pidfd, WAIT)  # exited: readable
    finally:
        os.close(pidfd)


def test_pidfd_open_of_dead_pid_is_process_lookup_error():
    pid = dead_pid()
    with pytest.raises(ProcessLookupError) as e:
        proc.pidfd_open(pid)
    assert e.value.errno == errno.ESRCH
    assert "pidfd_open" in str(e.value) and f"pid {pid}" in str(e.value)


def test_pidfd_getfd_takes_a_childs_pipe(child):
    def make_pipe(rep):
        r, w = os.pipe()
        os.write(w, b"written by the child")
        os.write(rep, str(r).encode())

    c = child(make_pipe)
    target = int(c.report())
    pidfd = proc.pidfd_open(c.pid)
    try:
        fd = proc.pidfd_getfd(pidfd, target, c.pid)
        try:
            assert os.get_inheritable(fd) is False  # the kernel sets O_CLOEXEC
            assert os.read(fd, 100) == b"written by the child"
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            proc.pidfd_getfd(pidfd, 999, c.pid)  # no such fd in the child
        assert e.value.errno == errno.EBADF
        assert f"pidfd_getfd (pid {c.pid})" in str(e.value)
    finally:
        os.close(pidfd)


# --- process_madvise --------------------------------------------------------------

@pytest.fixture
def child_with_pages(child):
    m = anon(8)
    addr = addr_of(m)

    def touch(rep):
        m[:] = pattern(8 * PAGE, 40)
        os.write(rep, b"touched")

    c = child(touch)
    assert c.report() == b"touched"
    pidfd = proc.pidfd_open(c.pid)
    yield c, pidfd, m, addr
    os.close(pidfd)
    c.release()
    m.close()


def test_process_madvise_dontneed_on_other_process_is_einval(child_with_pages):
    c, pidfd, m, addr = child_with_pages
    with pytest.raises(OSError) as e:
        proc.process_madvise(pidfd, [addr], [2 * PAGE], proc.MADV_DONTNEED)
    assert e.value.errno == errno.EINVAL
    assert "process_madvise" in str(e.value)
    # the child's pages are untouched
    dest = bytearray(2 * PAGE)
    assert proc.vm_readv(c.pid, addr_of(dest), [addr], [2 * PAGE]) == 2 * PAGE
    assert bytes(dest) == pattern(8 * PAGE, 40)[: 2 * PAGE]


def test_process_madvise_pageout_on_other_process(child_with_pages):
    c, pidfd, m, addr = child_with_pages
    n = proc.process_madvise(pidfd, [addr, addr + 4 * PAGE], [2 * PAGE, 3 * PAGE],
                             proc.MADV_PAGEOUT)
    assert n == 5 * PAGE
    # paged out or not (no swap here), the contents stay the child's
    dest = bytearray(8 * PAGE)
    assert proc.vm_readv(c.pid, addr_of(dest), [addr], [8 * PAGE]) == 8 * PAGE
    assert bytes(dest) == pattern(8 * PAGE, 40)


@pytest.mark.skipif(kernel_version() < (6, 13), reason="PIDFD_SELF needs Linux >= 6.13")
def test_process_madvise_self_zaps_several_ranges():
    m = anon(10)
    try:
        addr = addr_of(m)
        data = pattern(10 * PAGE, 50)
        m[:] = data
        me = os.getpid()
        assert proc.pagemap_present(me, addr, 10).all()
        ranges = [(1, 1), (3, 2), (7, 3)]  # (first page, pages)
        n = proc.process_madvise(PIDFD_SELF, [addr + p * PAGE for p, _ in ranges],
                                 [k * PAGE for _, k in ranges], proc.MADV_DONTNEED)
        assert n == 6 * PAGE
        zapped = [False] * 10
        for p, k in ranges:
            zapped[p:p + k] = [True] * k
        assert proc.pagemap_present(me, addr, 10).tolist() == [not z for z in zapped]
        want = b"".join(bytes(PAGE) if zapped[i] else data[i * PAGE:(i + 1) * PAGE]
                        for i in range(10))
        assert m[:] == want
    finally:
        m.close()


def test_process_madvise_self_over_1024_ranges_in_several_calls():
    npages = 1100
    m = anon(2 * npages)
    try:
        addr = addr_of(m)
        m[:] = b"\x01" * len(m)
        starts = [addr + 2 * i * PAGE for i in range(npages)]  # every other page
        n = proc.process_madvise(PIDFD_SELF, starts, [PAGE] * npages, proc.MADV_DONTNEED)
        assert n == npages * PAGE
        z = proc.zero_pages(addr, 2 * npages)
        assert z[0::2].all() and not z[1::2].any()
    finally:
        m.close()


# --- process_vm_readv ---------------------------------------------------------------

def test_vm_readv_reads_the_childs_memory(child):
    m = anon(6)
    addr = addr_of(m)
    data = pattern(6 * PAGE, 60)

    def write(rep):
        m[:] = data
        os.write(rep, b"written")

    try:
        c = child(write)
        assert c.report() == b"written"
        dest = anon(3)
        try:
            # pages 1, and 3..4, back to back
            n = proc.vm_readv(c.pid, addr_of(dest), [addr + PAGE, addr + 3 * PAGE],
                              [PAGE, 2 * PAGE])
            assert n == 3 * PAGE
            assert dest[:] == data[PAGE:2 * PAGE] + data[3 * PAGE:5 * PAGE]
            assert m[:] == bytes(6 * PAGE)  # our own copy was never written
        finally:
            dest.close()
    finally:
        m.close()


def test_vm_readv_of_dead_pid_names_call_and_pid():
    pid = dead_pid()
    dest = bytearray(PAGE)
    with pytest.raises(ProcessLookupError) as e:
        proc.vm_readv(pid, addr_of(dest), [0x10000], [PAGE])
    assert e.value.errno == errno.ESRCH
    assert "process_vm_readv" in str(e.value)
    assert str(pid) in str(e.value)


def test_vm_readv_of_unmapped_address_is_efault(child):
    c = child()
    assert c.report() == b"up"
    dest = bytearray(PAGE)
    with pytest.raises(OSError) as e:
        proc.vm_readv(c.pid, addr_of(dest), [0x1000], [PAGE])  # nothing maps page 1
    assert e.value.errno == errno.EFAULT
    assert f"process_vm_readv (pid {c.pid})" in str(e.value)


# --- small readers -------------------------------------------------------------------

# page contents -> is it all zero? Non-zero bytes sit at the first and the last
# byte of a page and in its middle, so a scan that skips words shows.
ZERO_CASES = [
    ("all zero", [None, None, None], [True, True, True]),
    ("first byte", [0, None, 0], [False, True, False]),
    ("last byte", [None, PAGE - 1, None], [True, False, True]),
    ("middle word", [2048 + 3, None, None, 4095], [False, True, True, False]),
    ("every page", [5, 4000, 8], [False, False, False]),
]


@pytest.mark.parametrize("name,marks,want", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
def test_zero_pages(name, marks, want):
    buf = anon(len(marks))
    try:
        for i, off in enumerate(marks):
            if off is not None:
                buf[i * PAGE + off] = 0x80
        assert proc.zero_pages(addr_of(buf), len(marks)).tolist() == want
    finally:
        buf.close()


def test_tlb_shootdowns_never_decreases():
    first = proc.tlb_shootdowns()
    if platform.machine() not in ("x86_64", "i686"):
        assert first is None or isinstance(first, int)
        return
    assert isinstance(first, int) and first >= 0
    # zapping pages another CPU may hold in its TLB can only add shootdowns
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: stop.wait(1), daemon=True)
    spinner.start()
    m = anon(64)
    try:
        for _ in range(20):
            m[:] = b"\x02" * len(m)
            proc.process_madvise(PIDFD_SELF, [addr_of(m)], [len(m)], proc.MADV_DONTNEED)
        second = proc.tlb_shootdowns()
        assert isinstance(second, int) and second >= first
    finally:
        stop.set()
        spinner.join(WAIT)
        m.close()


def test_pagemap_present_after_touching_some_pages():
    m = anon(8)
    try:
        addr = addr_of(m)
        for i in (1, 4, 7):
            m[i * PAGE + 10] = 1
        got = proc.pagemap_present(os.getpid(), addr, 8)
        assert got.dtype == np.bool_
        assert got.tolist() == [False, True, False, False, True, False, False, True]
    finally:
        m.close()


def test_pagemap_present_of_child_sees_its_own_pages(child):
    m = anon(4)
    addr = addr_of(m)

    def touch(rep):
        m[2 * PAGE] = 9
        os.write(rep, b"ok")

    try:
        c = child(touch)
        assert c.report() == b"ok"
        assert proc.pagemap_present(c.pid, addr, 4).tolist() == [False, False, True, False]
        assert proc.pagemap_present(os.getpid(), addr, 4).tolist() == [False] * 4
    finally:
        m.close()


def test_tgid_of_thread():
    assert procfs.tgid_of(threading.get_native_id()) == os.getpid()
    ev = threading.Event()
    live = threading.Thread(target=ev.wait, args=(WAIT,), daemon=True)
    live.start()
    try:
        assert live.native_id != os.getpid()
        assert procfs.tgid_of(live.native_id) == os.getpid()
    finally:
        ev.set()
        live.join(WAIT)
    assert procfs.tgid_of(dead_pid()) is None


def test_peer_credentials_of_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert proc.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
        assert proc.peer_credentials(b) == (os.getpid(), os.getuid(), os.getgid())


def test_read_maps_lists_our_mapping():
    m = anon(3)
    try:
        addr = addr_of(m)
        # the kernel may merge our mapping with an adjacent anonymous one
        hits = []
        for ln in proc.read_maps(os.getpid()).splitlines():
            lo, hi = (int(x, 16) for x in ln.split()[0].split("-"))
            if lo <= addr and addr + 3 * PAGE <= hi:
                hits.append(ln.split())
        assert len(hits) == 1
        assert hits[0][1] == "rw-p" and len(hits[0]) == 5  # anonymous: no path
    finally:
        m.close()


def test_proc_readers_of_dead_pid_name_the_file_and_pid():
    pid = dead_pid()
    # /proc/PID is gone: open() says ENOENT, and that errno is kept
    with pytest.raises(FileNotFoundError) as e:
        proc.read_maps(pid)
    assert f"read /proc/PID/maps (pid {pid})" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        proc.pagemap_present(pid, 0x10000, 1)
    assert f"open /proc/PID/pagemap (pid {pid})" in str(e.value)
