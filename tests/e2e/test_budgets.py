"""Budgets: the server holds each program's resident managed memory at its
budget by reclaiming its coldest pages, a batch at a time, while the
program keeps touching everything."""
import threading
import time

from ..conftest import Server, Workload, uffdsrv, wait_client
from ..support import wait_until

MIB = 1 << 20
BATCH = 16 * MIB  # reclaim.BATCH_PAGES pages


def test_budget_holds_while_the_program_runs(server, workload):
    w = workload(mib=96, threads=2)
    w.cmd("fill 1")
    # the server finds new mappings by rescanning /proc/PID/maps every second
    wait_until(lambda: server.client(w.pid)["managed_bytes"] >= 96 * MIB)
    budget = 24 * MIB
    r = uffdsrv("limit", "--socket", server.socket, "--pid", str(w.pid), "--bytes", "24M")
    assert f'"budget_bytes": {budget}' in r.stdout
    wait_until(lambda: server.client(w.pid)["resident_bytes"] <= budget)
    samples, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(server.client(w.pid)["resident_bytes"])
            time.sleep(0.02)
    t = threading.Thread(target=watch)
    t.start()
    try:
        for gen in range(2, 6):  # every page comes back, again and again
            assert w.cmd(f"write {gen} 1") == "ok"
            assert w.verify() == (w.npages, 0)
    finally:
        stop.set()
        t.join()
    # The budget is enforced after the fact: the budget loop looks every
    # 50 ms and reclaims a batch at a time, while the program faults its
    # pages back at full speed, which the native fault path makes faster
    # than reclaim. Read every 20 ms against a budget of 24 MiB and batches
    # of 16 MiB, the peaks were 42-56 MiB, and up to 91 of the 96 MiB with
    # both CPUs busy, while the median stayed at 24.6-25.7 MiB. Only faults
    # held while over budget would bound the peak; what the loop holds is
    # the level the program runs at.
    samples.sort()
    median, peak = samples[len(samples) // 2], samples[-1]
    assert 0 < median <= budget + BATCH, (median / MIB, peak / MIB)
    wait_until(lambda: server.client(w.pid)["resident_bytes"] <= budget)
    # no budget: nothing is reclaimed any more
    uffdsrv("limit", "--socket", server.socket, "--pid", str(w.pid), "--bytes", "none")
    w.cmd("touch")
    time.sleep(0.3)
    assert server.client(w.pid)["resident_bytes"] >= 90 * MIB


def test_config_file_budget_by_program_name(need_kernel, tmp_path):
    cfg = tmp_path / "uffdsrv.toml"
    cfg.write_text('default_budget = "1G"\n[[client]]\ncomm = "workload"\nbudget = "8M"\n')
    s = Server(tmp_path, extra=["--config", str(cfg)]).start()
    try:
        w = Workload(s.socket, mib=32)
        wait_client(s, w.pid)
        assert s.client(w.pid)["budget_bytes"] == 8 * MIB
        w.cmd("fill 1")
        wait_until(lambda: s.client(w.pid)["managed_bytes"] >= 32 * MIB)
        wait_until(lambda: s.client(w.pid)["resident_bytes"] <= 8 * MIB)
        assert w.verify() == (w.npages, 0)
        w.close()
    finally:
        assert s.stop() == 0


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[client]]\nbudget = "8M"\n')
    r = uffdsrv("serve", "--socket", str(tmp_path / "s"), "--swap", str(tmp_path / "swap"),
                "--config", str(cfg), check=False, timeout=30)
    assert r.returncode != 0 and "matches nothing" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
