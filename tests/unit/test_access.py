"""Access rules and the kernel text they read (core/access.py), and the log
limiter of the control socket (core/ratelimit.py)."""
import pytest

from uffdsrv.core import access
from uffdsrv.core.ratelimit import LogLimit

SMAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac sd
7f5022bbb000-7f5022bbc000 rw-p 00000000 00:00 0
Size:                  4 kB
THPeligible:    0
VmFlags: rd wr mr mw me ac um uw
7ffc1000000-7ffc1021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
"""


def test_parse_ids():
    assert access.parse_ids("1000, 1001,,7") == {1000, 1001, 7}
    assert access.parse_ids("") == frozenset()
    for bad in ("root", "-1", "1.5", str(1 << 32)):
        with pytest.raises(ValueError):
            access.parse_ids(bad)


def test_socket_mode():
    assert access.socket_mode(set(), set()) == (0o600, None)
    assert access.socket_mode(set(), {42}) == (0o660, 42)
    assert access.socket_mode({1000}, set()) == (0o666, None)
    assert access.socket_mode(set(), {1, 2}) == (0o666, None)
    assert access.socket_mode({1000}, {42}) == (0o666, None)


@pytest.mark.parametrize("uid,gids,allow_uids,allow_gids,ok", [
    (0, [], (), (), True),  # root
    (500, [], (), (), True),  # the server's own uid
    (1000, [1000], (), (), False),  # anyone else, by default
    (1000, [1000], (1000,), (), True),
    (1001, [1001], (1000,), (), False),
    (1001, [1001, 42], (), (42,), True),  # a supplementary group
    (1001, [1001], (), (42,), False),
    (-1, [], (-1,), (-1,), False),  # no credentials: never
])
def test_peer_allowed(uid, gids, allow_uids, allow_gids, ok):
    assert access.peer_allowed(uid, gids, 500, allow_uids, allow_gids) is ok


def test_privileged():
    assert access.privileged(0, 500) and access.privileged(500, 500)
    assert not access.privileged(1000, 500) and not access.privileged(-1, 500)


def test_fdinfo_features():
    text = "pos:\t0\nflags:\t02004000\npending:\t0\ntotal:\t0\nAPI:\taa:8000014e:80000000000001ff\n"
    assert access.fdinfo_features(text) == 0x14E
    # not through UFFDIO_API yet: no INITIALIZED bit
    assert access.fdinfo_features(text.replace("8000014e", "0")) is None
    assert access.fdinfo_features("pos:\t0\nflags:\t02\n") is None  # not a uffd
    assert access.fdinfo_features("API:\taa\n") is None
    assert access.fdinfo_features("API:\taa:zz:0\n") is None


def test_vmflags_at():
    assert access.vmflags_at(SMAPS, 0x7F5022BBB000) >= {"um", "uw"}
    assert access.vmflags_at(SMAPS, 0x7F5022BBBFFF) >= {"um"}
    assert "um" not in access.vmflags_at(SMAPS, 0x55D0C0000000)
    assert access.vmflags_at(SMAPS, 0x7F5022BBC000) is None  # the end is outside
    assert access.vmflags_at(SMAPS, 0) is None
    assert access.vmflags_at("", 0x1000) is None


def test_log_limit():
    now = [0.0]
    lim = LogLimit(burst=3, period=1.0, clock=lambda: now[0])
    assert [lim.allow() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] = 1.5
    assert lim.allow() == 2  # the two held back are reported with the next line
    assert lim.allow() == 0
