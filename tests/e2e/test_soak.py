"""Soak: eight managed programs with mixed reads and writes, forks, exits
and replacements, the program's own DONTNEEDs, reclaim at random budgets,
and random kill -9 restarts of the server. At the end every page verifies,
the swap slots are back to zero, and the server's memory is flat.

CI runs a short round; `pytest --long tests/e2e/test_soak.py` runs ten
minutes."""
import random
import signal
import time

from ..conftest import Server, Workload, wait_client
from ..support import wait_until

MIB = 1 << 20
PROGRAMS = 8


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_soak(need_kernel, tmp_path, request):
    seconds = 600 if request.config.getoption("--long") else 25
    rnd = random.Random(2024)
    s = Server(tmp_path).start()
    programs: list[Workload] = []
    stats = {"rounds": 0, "restarts": 0, "forks": 0, "replaced": 0, "verified": 0,
             "reclaims": 0}
    rss = []

    def spawn(seed):
        w = Workload(s.socket, mib=rnd.choice((4, 8, 12)), threads=2, seed=seed)
        wait_client(s, w.pid)
        w.cmd("fill 1")
        w.gen = 1
        return w
    try:
        programs = [spawn(i) for i in range(PROGRAMS)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stats["rounds"] += 1
            for w in programs:
                op = rnd.random()
                if op < 0.35:
                    w.gen += 1
                    assert w.cmd(f"write {w.gen} {rnd.choice((1, 2, 3, 7))}") == "ok"
                elif op < 0.55:
                    s.reclaim(w.pid, keep=rnd.choice((0, 1, 2)) * MIB)
                    stats["reclaims"] += 1
                elif op < 0.65:
                    a = rnd.randrange(w.npages - 64)
                    assert w.cmd(f"dontneed {a} {a + rnd.randrange(1, 64)}") == "ok"
                elif op < 0.75:
                    assert w.cmd("fork") == f"ok {w.npages} 0"
                    assert w.proc.stdout.readline().split()[:2] == ["forked", "0"]
                    stats["forks"] += 1
                else:
                    assert w.verify() == (w.npages, 0)
                    stats["verified"] += w.npages
            if rnd.random() < 0.25:  # a program exits, a new one comes
                i = rnd.randrange(len(programs))
                assert programs[i].verify() == (programs[i].npages, 0)
                programs[i].close()
                programs[i] = spawn(1000 + stats["rounds"])
                stats["replaced"] += 1
            if rnd.random() < 0.2:   # the server dies
                # A REMOVE is consumed when it is read, before the server can
                # journal it: a kill in that instant would bring a page the
                # program had just discarded back with its old bytes instead
                # of zeros (README, "Crashes"). Let the server catch up first;
                # every other moment is fair game.
                s.status()
                s.proc.send_signal(signal.SIGKILL)
                s.proc.wait()
                s = Server(tmp_path).start()
                stats["restarts"] += 1
                rss = []  # memory is compared over one server's life
            rss.append(rss_kib(s.proc.pid))
        for w in programs:
            assert w.verify() == (w.npages, 0)
            stats["verified"] += w.npages
            w.close()
        programs = []
        wait_until(lambda: not (s.status()["swap"]["used_bytes"] or s.status()["clients"]),
                   message=lambda: f"clients or slots left: {s.status()}")
    finally:
        for w in programs:
            w.close()
        s.stop()
    # flat memory: the server that ran last did not grow through its life
    print(f"\nsoak: {stats}, last server's RSS {rss[0] if rss else 0}..{max(rss or [0])} KiB "
          f"over {len(rss)} rounds")
    assert stats["rounds"] >= 3
    if len(rss) >= 5:  # the page maps and buffers are sized at start; nothing may pile up
        assert max(rss[len(rss) // 2:]) - rss[len(rss) // 2] < 16 * 1024, rss
    assert "Traceback" not in s.log_text(), s.log_text()
