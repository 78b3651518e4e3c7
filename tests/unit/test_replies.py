"""A control reply cut into message-sized parts and joined again
(core/replies.py), with no socket: every part fits, the join is the
reply, and what cannot be cut says so."""
import json

import pytest

from uffdsrv.core import replies

LIMIT = 1000


def status(n: int) -> dict:
    return {"clients": [{"pid": 1000 + i, "comm": "w" * (i % 13), "bytes": i * 4096}
                        for i in range(n)],
            "swap": {"path": "/s", "used_bytes": 7}, "kernel": {"release": "6.18"}}


@pytest.mark.parametrize("n", [0, 1, 5, 20, 21, 22, 100, 1000])
def test_parts_fit_and_join_back_to_the_reply(n):
    reply = status(n)
    parts = replies.split(reply, LIMIT)
    assert all(len(json.dumps(p).encode()) <= LIMIT for p in parts)
    if len(json.dumps(reply)) <= LIMIT:
        assert parts == [reply]
    else:
        assert len(parts) > 1 and all(p.get("more") == "clients" for p in parts[:-1])
    # each part goes through JSON on its own, as over the socket
    j = replies.Joiner()
    got = [j.add(json.loads(json.dumps(p))) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1)
    assert got[-1] == reply


def test_a_joiner_serves_one_reply_after_another():
    j = replies.Joiner()
    for n in (300, 2, 300):
        reply = status(n)
        out = [j.add(p) for p in replies.split(reply, LIMIT)]
        assert out[-1] == reply


def test_the_longest_list_is_the_one_cut():
    reply = {"few": [1, 2], "many": list(range(400)), "x": 1}
    parts = replies.split(reply, 300)
    assert {p.get("more") for p in parts[:-1]} == {"many"}
    assert parts[-1]["few"] == [1, 2] and parts[-1]["x"] == 1
    j = replies.Joiner()
    assert [j.add(p) for p in parts][-1] == reply


def test_what_cannot_be_cut_is_an_error_not_a_part_too_large():
    with pytest.raises(ValueError, match="no list"):
        replies.split({"text": "y" * 2000}, LIMIT)
    with pytest.raises(ValueError, match="one item"):
        replies.split({"clients": [{"comm": "z" * 2000}]}, LIMIT)
    with pytest.raises(ValueError):
        replies.split({"clients": [1] * 500, "text": "y" * 2000}, LIMIT)


def test_a_bad_part_is_refused():
    j = replies.Joiner()
    with pytest.raises(ValueError):
        j.add({"more": "clients", "clients": 5})
    with pytest.raises(ValueError):
        j.add({"more": 3})
    j = replies.Joiner()
    j.add({"more": "clients", "clients": [1]})
    with pytest.raises(ValueError):
        j.add({"clients": "not a list"})
