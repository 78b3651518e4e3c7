"""Budgets from the config file, and what `choose` does with heat and age."""
import numpy as np
import pytest

from uffdsrv.core.budgets import load, parse_size
from uffdsrv.core.pages import PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.policy import age, choose


@pytest.mark.parametrize("text, want", [
    ("4096", 4096), ("64M", 64 << 20), ("1.5G", 3 << 29), ("2k", 2048), ("8MiB", 8 << 20),
    (1234, 1234),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["lots", "-1M", "", None, True, -5, "1X"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_rules_match_in_order_then_default():
    b = load('default_budget = "1G"\n'
             '[[client]]\ncomm = "redis-server"\nbudget = "64M"\n'
             '[[client]]\ncgroup = "/system.slice/worker"\nbudget = "8M"\n')
    assert b.for_client("redis-server", "/user.slice") == 64 << 20
    assert b.for_client("python3", "/system.slice/worker.service") == 8 << 20
    assert b.for_client("python3", "/user.slice") == 1 << 30
    assert load("").for_client("x", "") is None


@pytest.mark.parametrize("text, reason", [
    ("[[client]]\nbudget = '8M'\n", "matches nothing"),
    ("[[client]]\ncomm = 'x'\n", "no budget"),
    ("[[client]]\ncomm = 'x'\nbudget = '8M'\ncolour = 'red'\n", "unknown keys"),
    ("budgt = '1G'\n", "unknown config keys"),
    ("default_budget = 'lots'\n", "not a size"),
    ("[[client]\n", "not valid TOML"),
    ("[[client]]\ncomm = 3\nbudget = '8M'\n", "must be a string"),
])
def test_bad_configs_say_why(text, reason):
    with pytest.raises(ValueError, match=reason):
        load(text)


def region(states, heat=None, stamp=None, start=0x100000):
    pm = PageMap()
    r = pm.add(start, start + len(states) * PAGE)
    r.state[:] = [{"R": RESIDENT, "S": SWAPPED}[c] for c in states]
    r.slot[r.state == SWAPPED] = np.arange(int((r.state == SWAPPED).sum()))
    if heat is not None:
        r.heat[:] = heat
    if stamp is not None:
        r.stamp[:] = stamp
    return pm, r


def test_fifo_takes_the_longest_resident_first():
    pm, r = region("RRRRS", stamp=[50, 10, 40, 20, 0])
    assert choose(pm, 2, "fifo")[1].tolist() == [1, 3]


def test_coldest_spares_pages_that_came_back():
    pm, r = region("RRRR", heat=[3, 0, 1, 0], stamp=[1, 4, 2, 3])
    assert choose(pm, 3, "coldest")[1].tolist() == [1, 2, 3]
    assert choose(pm, 1, "coldest")[1].tolist() == [3]


def test_random_takes_resident_pages_only():
    pm, r = region("RSRSRS")
    got = choose(pm, 10, "random", np.random.default_rng(1))[1]
    assert sorted(got.tolist()) == [0, 2, 4]


def test_a_batch_takes_one_region_the_one_with_most_picks():
    pm = PageMap()
    a = pm.add(0x100000, 0x100000 + 4 * PAGE)
    b = pm.add(0x200000, 0x200000 + 4 * PAGE)
    a.state[:] = b.state[:] = RESIDENT
    a.stamp[:] = [1, 100, 100, 100]
    b.stamp[:] = [2, 3, 4, 100]
    r, idx = choose(pm, 4, "fifo")
    assert r is b and idx.tolist() == [0, 1, 2]


def test_age_halves_heat():
    pm, r = region("RRR", heat=[255, 3, 1])
    age(pm)
    assert r.heat.tolist() == [127, 1, 0]
