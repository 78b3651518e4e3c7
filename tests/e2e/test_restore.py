"""`uffdsrv restore --pid P` and the agent's RESTORE: every reclaimed page
comes back and the program is no longer managed, so that readers that do
not fault through a userfaultfd (/proc/PID/mem, ptrace, a core dump) see
its bytes. Before it, such a read of a reclaimed page fails (EIO): the
test asserts that first, so it proves the restore did the work."""
import errno
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from uffdsrv.core import protocol as p

from ..conftest import PY, ROOT, Server, Workload, uffdsrv, wait_client

PAGE = 4096
MIB = 1 << 20


def workload_pages(npages: int, gen: int, seed: int = 1) -> np.ndarray:
    """What native/tools/workload.c writes on `fill gen`: word w of page i
    is splitmix64(seed ^ i << 20 ^ gen << 40 ^ w)."""
    with np.errstate(over="ignore"):
        i = np.arange(npages, dtype=np.uint64)[:, None]
        w = np.arange(PAGE // 8, dtype=np.uint64)[None, :]
        x = np.uint64(seed) ^ (i << np.uint64(20)) ^ np.uint64(gen << 40) ^ w
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def read_mem(pid: int, addr: int, length: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(fd, min(length - len(out), 1 << 20), addr + len(out))
            if not chunk:
                raise OSError(errno.EIO, "short read of /proc/PID/mem")
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def assert_unreadable(pid: int, addr: int) -> None:
    with pytest.raises(OSError) as e:
        read_mem(pid, addr, PAGE)
    assert e.value.errno in (errno.EIO, errno.EFAULT), e.value


def test_restore_cli_makes_proc_pid_mem_read_every_reclaimed_byte(server, workload):
    w = workload(mib=16, threads=2)
    assert w.cmd("fill 1") == "ok"
    assert server.reclaim(w.pid) >= 15 * MIB
    assert server.client(w.pid)["swapped_bytes"] >= 15 * MIB
    assert_unreadable(w.pid, w.addr)  # today's hole: a reclaimed page is EIO there
    assert_unreadable(w.pid, w.addr + (w.npages - 1) * PAGE)

    r = uffdsrv("restore", "--socket", server.socket, "--pid", str(w.pid))
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and f"pid {w.pid}" in lines[0], r.stdout
    assert int(lines[0].split(":")[1].split()[0]) >= w.npages, lines[0]

    got = np.frombuffer(read_mem(w.pid, w.addr, w.npages * PAGE), dtype=np.uint64)
    want = workload_pages(w.npages, 1).reshape(-1)
    bad = int(np.count_nonzero((got != want).reshape(w.npages, -1).any(axis=1)))
    assert bad == 0, f"{bad} of {w.npages} pages read wrong through /proc/PID/mem"

    c = server.client(w.pid)
    assert c["swapped_bytes"] == 0 and c["managed_bytes"] == 0 and c["restored"], c
    assert server.status()["swap"]["used_bytes"] == 0
    # a reclaim now finds nothing managed, and takes nothing back
    assert server.reclaim(w.pid) == 0
    assert w.verify() == (w.npages, 0)
    assert read_mem(w.pid, w.addr, PAGE) == got[:PAGE // 8].tobytes()


def test_restore_of_an_unknown_pid_is_one_line_and_nonzero(server):
    r = uffdsrv("restore", "--socket", server.socket, "--pid", "999999999", check=False)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "999999999" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


PROGRAM = textwrap.dedent("""
    import hashlib, mmap, os, socket, struct, sys
    sys.path.insert(0, sys.argv[3])
    from uffdsrv import client
    from uffdsrv.core import protocol as p
    PAGE = 4096
    n = int(sys.argv[2])
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert client.start(sys.argv[1]), client.status()
    for i in range(n):
        buf[i * PAGE:(i + 1) * PAGE] = hashlib.sha256(b"%d" % i).digest() * (PAGE // 32)
    client.register(buf)
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    print("ready", os.getpid(), addr, flush=True)
    for line in sys.stdin:
        if line.strip() == "restore":  # as the agent's fatal-signal path does
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(60)
            s.connect(sys.argv[1])
            s.send(p.pack(p.RESTORE, 42))
            mtype, seq = p.header(s.recv(p.MAX_MSG))
            s.close()
            print("reply", mtype, seq, flush=True)
        elif line.strip() == "verify":
            bad = sum(buf[i * PAGE:(i + 1) * PAGE]
                      != hashlib.sha256(b"%d" % i).digest() * (PAGE // 32) for i in range(n))
            print("ok", bad, flush=True)
        else:
            break
""")


def test_restore_message_from_the_managed_program_itself(server, tmp_path):
    import hashlib
    npages = 2048
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    proc = subprocess.Popen([PY, str(prog), server.socket, str(npages), str(ROOT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        pid, addr = int(ready[1]), int(ready[2])
        wait_client(server, pid)
        assert server.reclaim(pid) >= npages * PAGE // 2
        assert server.client(pid)["swapped_bytes"] >= npages * PAGE // 2
        assert_unreadable(pid, addr)
        proc.stdin.write("restore\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["reply", str(p.OK), "42"]
        data = read_mem(pid, addr, npages * PAGE)
        bad = sum(data[i * PAGE:(i + 1) * PAGE]
                  != hashlib.sha256(b"%d" % i).digest() * (PAGE // 32) for i in range(npages))
        assert bad == 0, f"{bad} of {npages} pages read wrong through /proc/PID/mem"
        c = server.client(pid)
        assert c["swapped_bytes"] == 0 and c["managed_bytes"] == 0, c
        proc.stdin.write("verify\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["ok", "0"]
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_restore_message_from_a_process_not_managed_is_a_protocol_error(server):
    """Only a managed program's agent sends RESTORE (as only an agent sends
    ZAP_DONE): from anyone else, and malformed, it is ERROR EPROTO."""
    for body in (b"", b"x" * 8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(server.socket)
        s.send(p.pack(p.RESTORE, 5, body))
        reply = s.recv(p.MAX_MSG)
        assert p.header(reply)[0] == p.ERROR and p.parse_error(reply)[0] == errno.EPROTO
        assert s.recv(p.MAX_MSG) == b""  # and the connection is closed
        s.close()


def test_a_restored_program_stays_unmanaged_across_a_crash_and_takeover(need_kernel,
                                                                         tmp_path):
    s = Server(tmp_path).start()
    w = Workload(s.socket, mib=8, threads=1)
    try:
        wait_client(s, w.pid)
        assert w.cmd("fill 1") == "ok"
        assert s.reclaim(w.pid) >= 7 * MIB
        uffdsrv("restore", "--socket", s.socket, "--pid", str(w.pid))
        s.kill()
        s = Server(tmp_path).start()
        wait_client(s, w.pid)
        time.sleep(2.5)  # two rescans: a program still taken for auto-maps is managed again
        c = s.client(w.pid)
        assert c["managed_bytes"] == 0 and c["swapped_bytes"] == 0, c
        assert w.verify() == (w.npages, 0)
        read_mem(w.pid, w.addr, w.npages * PAGE)  # no hole anywhere
    finally:
        w.close()
        s.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
