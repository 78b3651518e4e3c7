"""uffdsrv/harness.py: the one way tests, demo and bench start a server."""
import os
import signal
import time

import pytest

from uffdsrv import ctl
from uffdsrv.harness import ServerError, ServerProcess

MIB = 1 << 20


@pytest.fixture
def make(tmp_path):
    """ServerProcess on tmp_path; its swap file is removed at the end."""
    made = []

    def new(**kw) -> ServerProcess:
        s = ServerProcess(str(tmp_path / "s.sock"), str(tmp_path / "swap"), 16 * MIB,
                          log_path=str(tmp_path / "server.log"), **kw)
        made.append(s)
        return s
    yield new
    for s in made:
        s.kill()
    if (tmp_path / "swap").exists():
        (tmp_path / "swap").unlink()


def test_start_status_request_stop(need_kernel, tmp_path, make):
    s = make(state_dir=str(tmp_path / "state"), extra_args=["--log-level", "debug"])
    (tmp_path / "state").mkdir()
    t = time.monotonic()
    with s:
        assert time.monotonic() - t < 10
        assert os.path.exists(s.socket) and s.poll() is None and s.pid > 0
        st = s.status()
        assert st["clients"] == [] and st["swap"]["size_bytes"] == 16 * MIB, st
        # polls go over one kept connection; many in a row cost little
        t = time.monotonic()
        for _ in range(50):
            s.status()
        assert time.monotonic() - t < 5
        with pytest.raises(ctl.ControlError, match="not a managed process"):
            s.request("reclaim", pid=999999, keep_bytes=0)
        assert "--state-dir" in s.argv and "debug" in s.argv
    assert s.poll() == 0
    assert os.listdir(tmp_path / "state"), "the journal lives in --state-dir"
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_a_server_that_cannot_start_says_why(need_kernel, tmp_path):
    s = ServerProcess(str(tmp_path / "s.sock"), "/nonexistent/dir/swap", 16 * MIB,
                      log_path=str(tmp_path / "server.log"))
    with pytest.raises(ServerError, match="cannot open swap file"):
        s.start()
    assert s.poll() not in (None, 0)


def test_stop_raises_when_the_server_does_not_exit(need_kernel, make):
    s = make().start()
    os.kill(s.pid, signal.SIGSTOP)  # SIGTERM stays pending; it never exits
    try:
        with pytest.raises(ServerError, match="did not stop within 1 s"):
            s.stop(timeout=1)
    finally:
        if s.poll() is None:
            os.kill(s.pid, signal.SIGKILL)
    assert s.poll() == -signal.SIGKILL  # killed, never left behind


def test_kill_then_a_new_server_on_the_same_files(need_kernel, make):
    s = make().start()
    s.kill()
    assert s.poll() == -signal.SIGKILL
    with pytest.raises(ctl.Unreachable):
        s.status()
    again = make().start()  # over the dead server's socket file
    try:
        assert again.status()["clients"] == []
    finally:
        assert again.stop() == 0
