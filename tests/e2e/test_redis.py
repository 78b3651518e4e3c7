"""A real, unmodified program from Debian's packages: redis-server, run
under the agent with no rebuild. Its data must come back intact after most
of its memory was reclaimed and faulted back, through a BGSAVE fork too."""
import hashlib
import shutil
import subprocess
import sys
import time

import pytest

from ..conftest import ROOT, wait_client
from ..support import wait_until

redis = pytest.importorskip("redis")
MIB = 1 << 20
KEYS = 40_000
VALUE = 1024


def value(i: int, gen: int = 0) -> bytes:
    seed = hashlib.sha256(f"{i}:{gen}".encode()).digest()
    return (seed * (VALUE // len(seed) + 1))[:VALUE]


@pytest.fixture
def redis_server(server, tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uffdsrv", "run", "--socket", server.socket, "--", exe,
         "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--dbfilename", "dump.rdb"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        wait_client(server, proc.pid)
        yield proc, redis.Redis(unix_socket_path=str(sock)), tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(r, gen=0, step=1):
    pipe = r.pipeline(transaction=False)
    for i in range(0, KEYS, step):
        pipe.set(f"key:{i}", value(i, gen))
        if i % 2000 == 0:
            pipe.execute()
    pipe.execute()


def check(r, expect):
    bad = 0
    names = [f"key:{i}" for i in range(KEYS)]
    for lo in range(0, KEYS, 5000):
        got = r.mget(names[lo:lo + 5000])
        bad += sum(g != expect(lo + j) for j, g in enumerate(got))
    return bad


def test_redis_data_survives_reclaim_and_fork(server, redis_server):
    proc, r, tmp = redis_server
    load(r)
    server.reclaim(proc.pid)  # manages what redis has mapped by now
    c = server.client(proc.pid)
    assert c["managed_bytes"] >= 40 * MIB, c
    assert c["swapped_bytes"] >= 0.8 * (c["swapped_bytes"] + c["resident_bytes"]), c
    assert c["swapped_bytes"] >= 30 * MIB, c
    assert check(r, value) == 0
    # rewrite a quarter, reclaim again, then BGSAVE forks a child that
    # reads every value, reclaimed or not, and writes them to disk
    load(r, gen=1, step=4)

    def now(i):
        return value(i, 1 if i % 4 == 0 else 0)
    server.reclaim(proc.pid)
    c = server.client(proc.pid)
    assert c["swapped_bytes"] >= 0.8 * (c["swapped_bytes"] + c["resident_bytes"]), c
    before = r.lastsave()
    r.bgsave()
    wait_until(lambda: r.lastsave() != before, 60, "BGSAVE did not finish", interval=0.1)
    assert r.info("persistence")["rdb_last_bgsave_status"] == "ok"
    assert check(r, now) == 0
    # the saved file holds the same data: load it in a plain, unmanaged redis
    sock2 = tmp / "check.sock"
    plain = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock2),
                              "--dir", str(tmp), "--dbfilename", "dump.rdb", "--save", ""],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r2 = redis.Redis(unix_socket_path=str(sock2))
                if r2.dbsize() == KEYS:
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            assert time.monotonic() < deadline, "the RDB did not load"
            time.sleep(0.1)
        assert check(r2, now) == 0
    finally:
        plain.terminate()
        plain.wait(10)
