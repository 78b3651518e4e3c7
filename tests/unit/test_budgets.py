"""Budgets from the config file: sizes, rules matched in order, and
configs refused with the reason. (What the policy does with heat and age
is in test_policy.py.)"""
import pytest

from uffdsrv.core.budgets import load, parse_size


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
