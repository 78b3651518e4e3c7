"""Swap device faults: the swap file's filesystem fills up (ENOSPC) under
reclaim. Reclaim of the affected pages stops, no page is zapped unless its
bytes were written, the error is in the log and the metrics, and the
server stays up."""
import shlex
import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT, Server, Workload, uffdsrv, wait_client

MIB = 1 << 20


@pytest.fixture
def small_fs(need_kernel, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_reclaim_and_loses_nothing(small_fs, tmp_path):
    state = tmp_path / "state"
    s = Server(tmp_path, swap_size="64M", swap=str(small_fs / "swap"), state_dir=str(state))
    s.start()
    w = Workload(s.socket, mib=16)
    try:
        wait_client(s, w.pid)
        w.cmd("fill 1")
        reclaimed = s.reclaim(w.pid)
        c = s.client(w.pid)
        # the 2 MiB filesystem holds at most 2 MiB of pages; the rest stays put
        assert reclaimed <= 2 * MIB and c["swapped_bytes"] <= 2 * MIB, c
        assert c["resident_bytes"] >= 14 * MIB, c
        assert w.verify() == (w.npages, 0)
        # the server is up and still serves the pages it did write
        s.reclaim(w.pid)
        assert w.verify() == (w.npages, 0)
        assert s.status()["clients"]
    finally:
        w.close()
        code = s.stop()
    log = s.log_text()
    assert code == 0, log
    assert "No space left on device" in log or "ENOSPC" in log, log
    assert "Traceback" not in log, log


def test_systemd_unit_restarts_on_failure_and_runs_our_cli():
    unit = (ROOT / "contrib" / "uffdsrv.service").read_text()
    assert "Restart=on-failure" in unit
    lines = unit.split("ExecStart=", 1)[1].splitlines()
    command = []
    for line in lines:  # the value goes on while a line ends with a backslash
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(command))
    assert Path(argv[0]).name == "uffdsrv" and argv[1] == "serve"
    from uffdsrv.cli import build_parser
    a = build_parser().parse_args(argv[1:])
    assert a.state_dir and a.swap and a.socket


def test_swap_file_is_private_and_never_followed_through_a_symlink(need_kernel, tmp_path):
    target = tmp_path / "victim"
    target.write_text("do not touch")
    link = tmp_path / "swap"
    link.symlink_to(target)
    r = uffdsrv("serve", "--socket", str(tmp_path / "s"), "--swap", str(link), check=False,
                timeout=30)
    assert r.returncode != 0 and "cannot open swap file" in r.stderr, r.stderr
    assert target.read_text() == "do not touch"
