"""The kernel probe on the running kernel, checked against the kernel by
other means, and every fallback path reached on purpose: the agent's zap
calls (forced with UFFDSRV_AGENT_ZAP, a knob for tests), SIGBUS for an
unreadable page with and without UFFDIO_POISON, and the refusals (a
feature hidden with UFFDSRV_KERNEL_HIDE). The same file runs on Debian's
6.1 in the VM (tests/kernel), where the fallbacks are the real paths."""
import ctypes
import errno
import os
import signal
import socket
import subprocess
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, WORKLOAD, Server, kernel_missing, wait_client
from uffdsrv.core.pages import PAGE
from uffdsrv.system import kernel, uffd

libc = ctypes.CDLL(None, use_errno=True)
SYS_PROCESS_MADVISE = 440  # x86-64
MADV_DONTNEED = 4


@pytest.fixture(scope="module")
def k():
    why = kernel_missing()
    if why:
        pytest.skip(why)
    return kernel.probe()


def need(k, feature: str):
    if not k.features[feature]:
        pytest.skip(f"the kernel lacks {feature}: {k.details.get(feature)}")


def test_probe_answers_every_feature_and_what_it_costs(k):
    assert set(k.features) == set(kernel.FEATURES)
    assert k.release == os.uname().release
    line = k.missing_line()
    for name in k.missing():
        assert name in line or name == "process_madvise_self", line
    assert (k.refusal() is None) == all(k.features[n] for n, (req, _) in
                                        kernel.FEATURES.items() if req)
    j = k.as_json()
    assert j["missing"] == k.missing() and j["features"] == k.features


def test_uffd_features_are_the_kernels_answer(k):
    fd = uffd.open_uffd()
    try:
        granted, _ = uffd.api(fd, 0)
    finally:
        os.close(fd)
    assert k.uffd_features == granted
    assert k.features["uffd_move"] == bool(granted & uffd.FEATURE_MOVE)
    assert k.features["uffd_wp_async"] == bool(granted & uffd.FEATURE_WP_ASYNC)
    assert k.features["uffd_events"] == (granted & uffd.REQUIRED_FEATURES
                                         == uffd.REQUIRED_FEATURES)


def _self_zap(pidfd: int) -> bool:
    """process_madvise(pidfd, DONTNEED) of a touched page through libc's
    syscall(), not the cffi path the probe takes."""
    import mmap
    m = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0:1] = b"\x07"
        buf = (ctypes.c_char * PAGE).from_buffer(m)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), PAGE)
        r = libc.syscall(SYS_PROCESS_MADVISE, pidfd, iov, 1, MADV_DONTNEED, 0)
        del buf
        return r == PAGE and m[0] == 0
    finally:
        m.close()


def test_process_madvise_answers_match_a_direct_call(k):
    assert k.features["process_madvise_self"] == _self_zap(-10000)
    pidfd = os.pidfd_open(os.getpid())
    try:
        assert k.features["process_madvise_dontneed"] == _self_zap(pidfd)
    finally:
        os.close(pidfd)


def test_dontcache_answer_matches_preadv2(k, tmp_path):
    d = kernel.probe(str(tmp_path))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * PAGE, 0)
        try:
            os.preadv(fd, [bytearray(PAGE)], 0, 0x80)  # RWF_DONTCACHE
            ok = True
        except OSError as e:
            assert e.errno in (errno.EOPNOTSUPP, errno.EINVAL), e
            ok = False
    finally:
        os.close(fd)
    assert d.features["rwf_dontcache"] == ok, d.details


def test_pagemap_scan_answer_matches_the_ioctl(k):
    import fcntl
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        try:
            fcntl.ioctl(f.fileno(), 0xC0606610, bytearray(96))  # all-zero: size 0
            answered = 0
        except OSError as e:
            answered = e.errno
    # a kernel with the ioctl checks the arg (EINVAL for size 0); one
    # without it has no ioctl on the file at all
    assert k.features["pagemap_scan"] == (answered != errno.ENOTTY), answered


def test_hidden_feature_reads_as_missing(k, monkeypatch):
    monkeypatch.setenv("UFFDSRV_KERNEL_HIDE", "pagemap_scan,uffd_wp")
    h = kernel.probe()
    assert not h.features["pagemap_scan"] and not h.features["uffd_wp"]
    assert "uffd_wp" in h.refusal() and "pagemap_scan" not in h.refusal()
    assert "pagemap_scan" in h.missing_line()


# --- refusal -------------------------------------------------------------

@pytest.mark.parametrize("hide", ["userfaultfd", "uffd_wp"])
def test_serve_refuses_with_one_line(k, tmp_path, hide):
    env = dict(os.environ, UFFDSRV_KERNEL_HIDE=hide)
    r = subprocess.run([PY, "-m", "uffdsrv", "serve", "--socket", str(tmp_path / "s"),
                        "--swap", str(tmp_path / "swap"), "--swap-size", "16M"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and hide in lines[0] and "uffdsrv serve" in lines[0], r.stderr
    assert not (tmp_path / "swap").exists() and not (tmp_path / "s").exists()


def test_run_without_userfaultfd_runs_the_program_unmanaged(k, tmp_path):
    env = dict(os.environ, UFFDSRV_KERNEL_HIDE="userfaultfd")
    p = subprocess.Popen([PY, "-m", "uffdsrv", "run", "--socket", str(tmp_path / "none"), "--",
                          str(WORKLOAD), "--mib", "4", "--threads", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=env)
    try:
        assert p.stdout.readline().startswith("ready"), p.stderr.read()
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "libuffdsrv_agent" not in maps
        p.stdin.write("fill 1\nverify\nexit\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        assert p.stdout.readline().split()[:3] == ["ok", str(4 << 20 >> 12), "0"]
        p.wait(30)
        lines = p.stderr.read().strip().splitlines()
        assert len(lines) == 1 and "unmanaged" in lines[0] and "userfaultfd" in lines[0], lines
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- status, metrics, log ------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_metric_and_log_carry_the_kernel(k, tmp_path, monkeypatch):
    monkeypatch.setenv("UFFDSRV_KERNEL_HIDE", "pagemap_scan")
    port = free_port()
    s = Server(tmp_path, swap_size="16M", extra=["--metrics-addr", f"127.0.0.1:{port}"])
    s.start(timeout=60)  # TCG in the VM is slow
    try:
        st = s.status()["kernel"]
        assert st["release"] == os.uname().release
        assert st["features"]["pagemap_scan"] is False
        want = dict(k.features, pagemap_scan=False)
        assert st["features"] == want and st["missing"] == [n for n in want if not want[n]]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = text.decode()
        for name, present in want.items():
            series = f'uffdsrv_kernel_feature{{feature="{name}"}} {1.0 if present else 0.0}'
            assert series in text, (series, text[:2000])
        log = s.log_text()
        assert "lacks" in log and "pagemap_scan" in log, log
    finally:
        assert s.stop() == 0


# --- the agent's zap calls -------------------------------------------------

PROGRAM = textwrap.dedent('''
    import mmap, sys
    from uffdsrv import client
    PAGE, n = 4096, int(sys.argv[2])
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ok = client.start(sys.argv[1])
    print("status", client.status(), flush=True)
    if not ok:
        sys.exit(1)
    gen = [1] * n
    def page(i):
        return bytes([i % 251 + 1, gen[i]]) * (PAGE // 2) if gen[i] else bytes(PAGE)
    for i in range(n):
        buf[i * PAGE:(i + 1) * PAGE] = page(i)
    client.register(buf)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *a = line.split()
        if cmd == "verify":
            bad = sum(buf[i * PAGE:(i + 1) * PAGE] != page(i) for i in range(n))
            print("ok", bad, flush=True)
        elif cmd == "dontneed":  # the program's own MADV_DONTNEED
            lo, hi = int(a[0]), int(a[1])
            buf.madvise(mmap.MADV_DONTNEED, lo * PAGE, (hi - lo) * PAGE)
            for i in range(lo, hi):
                gen[i] = 0
            print("ok", flush=True)
        elif cmd == "write":
            for i in range(0, n, 3):
                gen[i] = 2
                buf[i * PAGE:(i + 1) * PAGE] = page(i)
            print("ok", flush=True)
''')

MODES = {"self": "process_madvise PIDFD_SELF", "pidfd": "process_madvise pidfd",
         "madvise": "madvise per range"}


def _expected(k, force: str | None) -> str:
    if force == "madvise":
        return MODES["madvise"]
    if force != "pidfd" and k.features["process_madvise_self"]:
        return MODES["self"]
    return MODES["pidfd"] if k.features["process_madvise_dontneed"] else MODES["madvise"]


@pytest.mark.parametrize("force", [None, "pidfd", "madvise"])
def test_every_zap_path_drops_pages_that_come_back_right(k, tmp_path, force):
    if force == "pidfd":
        need(k, "process_madvise_dontneed")
    prog = tmp_path / "program.py"
    prog.write_text(PROGRAM)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("UFFDSRV_AGENT_ZAP", None)
    if force:
        env["UFFDSRV_AGENT_ZAP"] = force
    npages = 512
    s = Server(tmp_path, swap_size="16M").start(timeout=60)
    p = subprocess.Popen([PY, str(prog), s.socket, str(npages)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def cmd(line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
        out = p.stdout.readline().strip()
        assert out, p.stderr.read()
        return out
    try:
        status = p.stdout.readline().strip()
        assert status == f"status managed (zap: {_expected(k, force)})", (status,
                                                                          p.stderr.read())
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        wait_client(s, p.pid)
        assert s.reclaim(p.pid) >= (npages - 8) * PAGE
        assert s.client(p.pid)["swapped_bytes"] >= (npages - 8) * PAGE
        assert cmd("verify") == "ok 0"
        assert cmd("write") == "ok"
        s.reclaim(p.pid)
        assert cmd("dontneed 100 300") == "ok"  # reclaimed pages: must read zeros
        assert cmd("verify") == "ok 0"
        s.reclaim(p.pid)
        assert cmd("verify") == "ok 0"
        assert "Traceback" not in s.log_text()
    finally:
        p.stdin.close()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        assert s.stop() == 0, s.log_text()


# --- an unreadable page ----------------------------------------------------

FAULTER = textwrap.dedent('''
    import ctypes, mmap, os, resource, select, sys, threading
    from uffdsrv.system import kernel, uffd
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    poison = sys.argv[1] == "poison"
    m = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    from uffdsrv.system.swapdev import address
    addr = address(m)
    fd = uffd.open_uffd()
    uffd.api(fd, kernel.lib.UFFD_FEATURE_POISON if poison else 0)
    uffd.register(fd, addr, 4096, uffd.REGISTER_MODE_MISSING)
    pidfd = os.pidfd_open(os.getpid())
    def serve():
        select.select([fd], [], [], 10)
        msg = uffd.parse(os.read(fd, uffd.MSG_SIZE), uffd.MSG_SIZE)[0]
        kernel.fail_page(fd, int(msg["a1"]), pidfd, poison)
    threading.Thread(target=serve, daemon=True).start()
    print("touching", flush=True)
    # the fault, taken with the GIL released (ctypes drops it) so that the
    # serving thread can run: it must end in SIGBUS
    memset = ctypes.CDLL(None).memset
    memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    memset(addr, 1, 1)
    print("read a page that could not be read", flush=True)
''')


@pytest.mark.parametrize("how", ["poison", "signal"])
def test_an_unreadable_page_ends_in_sigbus(k, tmp_path, how):
    if how == "poison":
        need(k, "uffdio_poison")
    prog = tmp_path / "faulter.py"
    prog.write_text(FAULTER)
    r = subprocess.run([PY, str(prog), how], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.stdout.strip() == "touching", (r.stdout, r.stderr)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
