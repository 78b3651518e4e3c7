"""The agent protocol: every parser answers a bad message with ProtocolError
(and nothing else), and what is packed parses back."""
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsrv.core import protocol as p
from uffdsrv.core.protocol import PAGE, USER_TOP, ProtocolError

HDR = p.HDR.size


def hdr(mtype=p.HELLO, seq=0, magic=p.MAGIC, version=p.VERSION) -> bytes:
    return p.HDR.pack(magic, version, mtype, seq)


# --- header ------------------------------------------------------------------------
@pytest.mark.parametrize("buf, match", [
    (b"", "shorter"),
    (hdr()[:-1], "shorter"),
    (hdr(magic=0xDEADBEEF), "magic"),
    (hdr(version=2), "version"),
    (hdr(version=0), "version"),
])
def test_header_rejects(buf, match):
    with pytest.raises(ProtocolError, match=match):
        p.header(buf)


@pytest.mark.parametrize("mtype, seq", [(p.HELLO, 0), (p.ZAP_DONE, 7), (p.CTL, 2**64 - 1)])
def test_pack_header_round_trip(mtype, seq):
    buf = p.pack(mtype, seq, b"xyz")
    assert len(buf) == HDR + 3
    assert p.header(buf) == (mtype, seq)
    assert buf[HDR:] == b"xyz"


# --- HELLO -----------------------------------------------------------------------------
def hello(flags=0, features=0, pstart=0x7F0000000000, plen=4 * PAGE, beacon=0x7F0000100000):
    return hdr(p.HELLO) + p.HELLO_BODY.pack(flags, 0, features, pstart, plen, beacon)


def test_hello_round_trip():
    buf = p.pack_hello(p.HELLO_FORKED | p.HELLO_AUTO_MAPS, 0x1234,
                       (0x7F0000000000, 0x7F0000004000), 0x7F0000100000)
    assert buf == hello(p.HELLO_FORKED | p.HELLO_AUTO_MAPS, 0x1234)
    assert p.header(buf) == (p.HELLO, 0)
    assert p.parse_hello(buf) == {"flags": 5, "features": 0x1234,
                                  "private": (0x7F0000000000, 0x7F0000004000),
                                  "beacon": 0x7F0000100000}


@pytest.mark.parametrize("buf, match", [
    (hello()[:-1], "bytes"),
    (hello() + b"\0", "bytes"),
    (hdr(p.HELLO), "bytes"),
    (hello(flags=16), "flags"),
    (hello(flags=0x80000000), "flags"),
    (hello(pstart=0x7F0000000001), "private_start"),
    (hello(pstart=USER_TOP), "private_start"),
    (hello(beacon=0x1800), "beacon_addr"),
    (hello(beacon=USER_TOP), "beacon_addr"),
    (hello(plen=PAGE + 1), "length"),
    (hello(pstart=USER_TOP - PAGE, plen=2 * PAGE), "length"),
])
def test_hello_rejects(buf, match):
    with pytest.raises(ProtocolError, match=match):
        p.parse_hello(buf)


def test_hello_accepts_edge_values():
    got = p.parse_hello(hello(flags=7, pstart=USER_TOP - PAGE, plen=PAGE, beacon=0))
    assert got["private"] == (USER_TOP - PAGE, USER_TOP)
    assert got["beacon"] == 0 and got["flags"] == 7


# --- ZAP / ZAP_DONE ----------------------------------------------------------------------
def test_pack_zap_layout():
    buf = p.pack_zap(9, [0x10000, 0x20000], [PAGE, 3 * PAGE], flags=p.ZAP_MADVISE)
    assert p.header(buf) == (p.ZAP, 9)
    assert p.ZAP_HEAD.unpack_from(buf, HDR) == (2, p.ZAP_MADVISE)
    off = HDR + p.ZAP_HEAD.size
    assert p.REGION_BODY.unpack_from(buf, off) == (0x10000, PAGE)
    assert p.REGION_BODY.unpack_from(buf, off + 16) == (0x20000, 3 * PAGE)
    assert len(buf) == off + 32


@pytest.mark.parametrize("n, ok", [(0, False), (1, True), (1024, True), (1025, False)])
def test_pack_zap_range_count(n, ok):
    starts, lens = [PAGE * i for i in range(n)], [PAGE] * n
    if ok:
        assert len(p.pack_zap(1, starts, lens)) == HDR + 8 + 16 * n
    else:
        with pytest.raises(ValueError):
            p.pack_zap(1, starts, lens)


def test_zap_done_round_trip():
    buf = p.pack(p.ZAP_DONE, 3, p.ZAP_DONE_BODY.pack(-1, 17, 22))
    assert p.parse_zap_done(buf) == (-1, 17, 22)


@pytest.mark.parametrize("extra", [-1, 1])
def test_zap_done_rejects_wrong_size(extra):
    body = p.ZAP_DONE_BODY.pack(0, 1, 0)
    buf = p.pack(p.ZAP_DONE, 3, body + b"\0" if extra > 0 else body[:-1])
    with pytest.raises(ProtocolError):
        p.parse_zap_done(buf)


# --- REGISTER / UNREGISTER ------------------------------------------------------------------
def region(start, length):
    return p.pack(p.REGISTER, 1, p.REGION_BODY.pack(start, length))


def test_region_round_trip():
    assert p.parse_region(region(0x10000, 2 * PAGE)) == (0x10000, 0x12000)
    assert p.parse_region(region(USER_TOP - PAGE, PAGE)) == (USER_TOP - PAGE, USER_TOP)


@pytest.mark.parametrize("buf", [
    region(0x10000, 0),
    region(0x10001, PAGE),
    region(0x10000, PAGE + 1),
    region(USER_TOP - PAGE, 2 * PAGE),
    region(USER_TOP, PAGE),
    region(0x10000, PAGE)[:-1],
    region(0x10000, PAGE) + b"\0",
])
def test_region_rejects(buf):
    with pytest.raises(ProtocolError):
        p.parse_region(buf)


# --- ERROR / CTL -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "no such process", "é" * 10])
def test_error_round_trip(text):
    buf = p.pack_error(4, 3, text)
    assert p.header(buf) == (p.ERROR, 4)
    assert p.parse_error(buf) == (3, text)


def test_error_text_is_capped():
    buf = p.pack_error(0, 1, "x" * 5000)
    assert p.parse_error(buf) == (1, "x" * 4000)


@pytest.mark.parametrize("obj", [{}, {"cmd": "status"}, {"cmd": "reclaim", "pid": 42,
                                                        "keep_bytes": 0, "x": [1, None]}])
def test_ctl_round_trip(obj):
    buf = p.pack_ctl(p.CTL, 5, obj)
    assert p.header(buf) == (p.CTL, 5)
    assert p.parse_ctl(buf) == obj


def test_ctl_too_large_is_refused():
    with pytest.raises(ValueError):
        p.pack_ctl(p.CTL, 1, {"x": "y" * p.MAX_MSG})


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"{", b"[1, 2]", b"3", b"null", b'"s"'])
def test_ctl_rejects(body):
    with pytest.raises(ProtocolError):
        p.parse_ctl(p.pack(p.CTL, 1, body))


def test_ctl_deep_nesting_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        p.parse_ctl(p.pack(p.CTL, 1, b"[" * 60000))


def test_ctl_huge_integer_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        p.parse_ctl(p.pack(p.CTL, 1, b'{"pid": ' + b"1" * 5000 + b"}"))


# --- property: random, truncated and oversized bytes raise only ProtocolError ---------------
PARSERS = [
    pytest.param(p.header, id="header"),
    pytest.param(p.parse_hello, id="hello"),
    pytest.param(p.parse_zap_done, id="zap_done"),
    pytest.param(p.parse_region, id="region"),
    pytest.param(p.parse_ctl, id="ctl"),
    pytest.param(p.parse_error, id="error"),
]
VALID = [hello(), p.pack(p.ZAP_DONE, 1, p.ZAP_DONE_BODY.pack(0, 1, 0)), region(0x10000, PAGE),
         p.pack_ctl(p.CTL, 1, {"cmd": "status"}), p.pack_error(1, 2, "bad")]

messages = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: hdr(p.CTL) + b),
    st.tuples(st.sampled_from(VALID), st.integers(0, 80)).map(lambda t: t[0][:t[1]]),
    st.tuples(st.sampled_from(VALID), st.binary(min_size=1, max_size=64))
    .map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from(VALID), st.integers(0, 60), st.integers(0, 255))
    .map(lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
)


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=150, deadline=None)
@given(buf=messages)
def test_parsers_raise_only_protocol_error(parse, buf):
    try:
        parse(buf)
    except ProtocolError:
        pass


def test_parsers_survive_oversized_messages():
    big = hdr(p.CTL) + b"\0" * p.MAX_MSG
    for parse in (p.parse_hello, p.parse_zap_done, p.parse_region, p.parse_ctl):
        with pytest.raises(ProtocolError):
            parse(big)
    assert p.header(big) == (p.CTL, 0)


# --- property: round trips ------------------------------------------------------------------
user_page = st.integers(0, USER_TOP // PAGE - 1).map(lambda n: n * PAGE)


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 15), features=st.integers(0, 2**64 - 1), pstart=user_page,
       npages=st.integers(0, 2**20), beacon=user_page)
def test_hello_property_round_trip(flags, features, pstart, npages, beacon):
    pend = min(pstart + npages * PAGE, USER_TOP)
    got = p.parse_hello(p.pack_hello(flags, features, (pstart, pend), beacon))
    assert got == {"flags": flags, "features": features, "private": (pstart, pend),
                   "beacon": beacon}


@settings(max_examples=200, deadline=None)
@given(start=user_page, npages=st.integers(1, 2**20), seq=st.integers(0, 2**64 - 1))
def test_region_property_round_trip(start, npages, seq):
    end = min(start + npages * PAGE, USER_TOP)
    buf = p.pack(p.UNREGISTER, seq, p.REGION_BODY.pack(start, end - start))
    assert p.header(buf) == (p.UNREGISTER, seq)
    assert p.parse_region(buf) == (start, end)


@settings(max_examples=200, deadline=None)
@given(res=st.integers(-2**63, 2**63 - 1), done=st.integers(0, p.MAX_ZAP_RANGES),
       err=st.integers(0, 2**31 - 1))
def test_zap_done_property_round_trip(res, done, err):
    buf = p.pack(p.ZAP_DONE, 1, p.ZAP_DONE_BODY.pack(res, done, err))
    assert p.parse_zap_done(buf) == (res, done, err)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       seq=st.integers(0, 2**64 - 1))
def test_ctl_property_round_trip(obj, seq):
    buf = p.pack_ctl(p.CTL_REPLY, seq, obj)
    assert p.header(buf) == (p.CTL_REPLY, seq)
    assert p.parse_ctl(buf) == obj
    assert json.loads(buf[HDR:]) == obj


@settings(max_examples=100, deadline=None)
@given(err=st.integers(-2**31, 2**31 - 1), text=st.text(max_size=50))
def test_error_property_round_trip(err, text):
    assert p.parse_error(p.pack_error(0, err, text)) == (err, text)


def test_struct_sizes_match_the_c_header():
    assert (p.HDR.size, p.HELLO_BODY.size, p.ZAP_HEAD.size, p.ZAP_DONE_BODY.size,
            p.REGION_BODY.size, p.ERROR_HEAD.size) == (16, 40, 8, 16, 16, 8)
    assert struct.calcsize("<IHHQ") == 16


def test_message_types_and_flags_match_the_c_header():
    """The numbers the agent sends are the ones the server reads: every
    UFS_ name of the C header has the same value here."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "native/include/uffdsrv_proto.h").read_text()
    c = {m[0]: int(m[1], 0) for m in re.findall(r"\bUFS_([A-Z_]+)\s*=\s*(\w+)", text)}
    c.update({m[0]: int(m[1], 0) for m in re.findall(
        r"#define UFS_(HELLO_[A-Z_]+)\s+(0x[0-9a-fA-F]+|\d+)", text)})
    assert {"DEVICE", "FORK_PREPARE", "FORK_DONE", "RESTORE"} <= set(c)
    for name, value in c.items():
        assert getattr(p, name) == value, name


@pytest.mark.parametrize("mtype", [p.RESTORE, p.DEVICE, p.FORK_PREPARE, p.FORK_DONE])
def test_bare_messages_are_a_header_only(mtype):
    p.parse_bare(p.pack(mtype, 3), "X")
    with pytest.raises(ProtocolError, match="X of 17 bytes"):
        p.parse_bare(p.pack(mtype, 3, b"\0"), "X")
