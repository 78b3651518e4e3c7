"""The explicit API: a Python program names the one buffer to manage, and
the kernel's own faults on it (read(2) into it, write(2) from it) are
served like the program's."""
import subprocess
import sys
from pathlib import Path

from ..conftest import ROOT, wait_client

MIB = 1 << 20
NPAGES = 4096


def start(server):
    p = subprocess.Popen([sys.executable, str(Path(__file__).with_name("api_program.py")),
                          server.socket, str(NPAGES)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stdout.readline().split()
    assert line[:1] == ["ready"], line
    wait_client(server, p.pid)
    return p


def ask(p, line):
    p.stdin.write(line + "\n")
    p.stdin.flush()
    return p.stdout.readline().split()


def test_explicit_region_reclaimed_and_kernel_faults_served(server, tmp_path):
    p = start(server)
    try:
        c = server.client(p.pid)
        assert c["managed_bytes"] == NPAGES * 4096  # only the named buffer
        server.reclaim(p.pid)
        assert server.client(p.pid)["swapped_bytes"] >= 0.99 * NPAGES * 4096
        # write(2) from reclaimed pages: the kernel faults them in
        assert ask(p, f"pwrite {tmp_path / 'out'}") == ["ok", str(NPAGES * 4096), "0"]
        server.reclaim(p.pid)
        # read(2) into reclaimed pages: copy_to_user faults on them
        assert ask(p, f"pread {tmp_path / 'in'} 7") == ["ok", str(NPAGES * 4096)]
        assert ask(p, "verify") == ["ok", "0"]
        server.reclaim(p.pid)
        assert ask(p, "unregister") == ["ok"]
        assert server.client(p.pid)["managed_bytes"] == 0
        assert server.status()["swap"]["used_bytes"] == 0
        assert ask(p, "verify") == ["ok", "0"]
        assert ask(p, "exit") == ["bye"]
    finally:
        p.kill()
        p.wait()
