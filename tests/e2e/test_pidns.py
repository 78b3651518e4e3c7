"""A fork inside a pid namespace: the THREAD_ID of the child's beacon fault
is its tid in its own namespace (a small number in a fresh `unshare -pf`),
not in the server's. The server must bind the child to its
real pid, serve and reclaim it, and leave no client behind when it exits.

The tree: `uffdsrv run -- unshare -pf --mount-proc python3 PROG`: unshare
(managed) forks PROG as pid 1 of a new namespace; PROG (managed again
after the exec) fills records and forks a child (pid 2 there) that holds
them. The test finds the child's real pid through /proc (its parent is
PROG, the one child of unshare that has children) and reclaims it by
that pid."""
import os
import shutil
import subprocess
import textwrap

import pytest

from ..conftest import PY, ROOT, wait_client
from ..support import wait_until

PAGE = 4096

PROG = textwrap.dedent("""
    import hashlib, mmap, os, sys
    PAGE = 4096
    n = int(sys.argv[1])
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    page = lambda i: hashlib.sha256(b"%d" % i).digest() * (PAGE // 32)
    for i in range(n):
        buf[i * PAGE:(i + 1) * PAGE] = page(i)
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        os._exit(0)
    print("child", os.getpid(), flush=True)
    for line in sys.stdin:
        if line.strip() == "verify":
            bad = sum(buf[i * PAGE:(i + 1) * PAGE] != page(i) for i in range(n))
            print("ok", bad, flush=True)
        else:
            break
    os._exit(0)
""")


def children(pid: int) -> list[int]:
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            data = open(f"/proc/{name}/stat", "rb").read()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
            out.append(int(name))
    return out


def nspid(pid: int) -> list[int]:
    """Its pids from ours down to its own namespace's ("NSpid:")."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def real_child(top: int, inside: int) -> int | None:
    """top is unshare; its child is PROG (pid 1 inside), and ours is the
    child of PROG whose pid in the namespace is `inside`."""
    for prog in children(top):
        kids = [k for k in children(prog) if nspid(k)[-1:] == [inside]]
        if len(kids) == 1:
            return kids[0]
    return None


def test_fork_in_a_pid_namespace_binds_the_real_child(server, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    npages = 4096
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    p = subprocess.Popen([PY, "-m", "uffdsrv", "run", "--socket", server.socket, "--",
                          "unshare", "-pf", "--mount-proc", PY, str(prog), str(npages)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    try:
        line = p.stdout.readline().split()
        if not line and "unshare" in (err := p.stderr.read()):
            pytest.skip(f"unshare -pf failed here: {err.strip()}")
        assert line[:1] == ["child"], line
        inside = int(line[1])  # its pid in its namespace: small (the agent's helpers count)
        child = wait_until(lambda: real_child(p.pid, inside), 10, "the child never showed in /proc")
        assert child != inside and nspid(child)[-1] == inside, (child, inside)
        c = wait_client(server, child)
        assert c["pid"] == child
        # the forked child's memory is the parent's, reclaimed through its own uffd
        assert server.reclaim(child) >= npages * PAGE // 2, server.log_text()
        assert server.client(child)["swapped_bytes"] >= npages * PAGE // 2
        p.stdin.write("verify\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["ok", "0"]
        pids = {c["pid"] for c in server.status()["clients"]}
        assert not pids & set(range(1, inside + 1)), f"a client bound to a namespace's pid: {pids}"
        p.stdin.write("exit\n")
        p.stdin.flush()
        assert p.wait(20) == 0
        # nothing left: no client for the tree, no unidentified child, no slot
        st = wait_until(lambda: (s := server.status())["clients"] == [] and not s.get(
            "unidentified", 1) and s["swap"]["used_bytes"] == 0 and s, 10,
            lambda: f"clients left after the tree exited: {server.status()}")
        assert st["unidentified"] == 0
        assert f"pid {child} is a child of" in server.log_text(), server.log_text()
        assert not any(f"pid {n} is a child" in server.log_text() for n in range(1, inside + 1))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
