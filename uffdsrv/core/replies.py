"""A control reply larger than one message, cut into parts and put back.

The control socket is SOCK_SEQPACKET with messages of at most
protocol.MAX_MSG bytes; `status` of a few hundred clients is more than
that. The one long thing a reply holds is a list (the clients), so a
reply too large for one message goes as several: every part but the last
carries {"more": KEY, KEY: [items...]}, and the last is the reply itself
with the rest of the items. Each part is a JSON object of its own, so a
part never needs the next one to be parsed. No I/O here.
"""
import json


def size(obj) -> int:
    return len(json.dumps(obj).encode())


def split(reply: dict, limit: int) -> list[dict]:
    """[reply] if it fits in `limit` bytes of JSON, else its parts.
    ValueError if even one item of its longest list does not fit."""
    if size(reply) <= limit:
        return [reply]
    lists = [k for k, v in reply.items() if isinstance(v, list) and v]
    if not lists:
        raise ValueError(f"a reply of {size(reply)} bytes with no list to cut")
    key = max(lists, key=lambda k: size(reply[k]))
    items = reply[key]
    last = dict(reply, **{key: []})
    room = limit - size({"more": key, key: []})
    if size(last) > limit:
        raise ValueError("a reply whose fields without its list do not fit a message")
    parts, chunk, used = [], [], 0
    for item in items:
        n = size(item) + 2  # the item and its ", "
        if n > room:
            raise ValueError(f"one item of {key!r} is {n} bytes, more than a message holds")
        if used + n > room:
            parts.append({"more": key, key: chunk})
            chunk, used = [], 0
        chunk.append(item)
        used += n
    if size(dict(last, **{key: chunk})) <= limit:
        parts.append(dict(last, **{key: chunk}))
    else:
        parts += [{"more": key, key: chunk}, last]
    return parts


class Joiner:
    """Feed it the parts as they come; add() -> the whole reply once the
    last part is in, None before."""

    def __init__(self):
        self.held: dict[str, list] = {}

    def add(self, part: dict) -> dict | None:
        key = part.get("more")
        if key is not None:
            if not isinstance(key, str) or not isinstance(part.get(key), list):
                raise ValueError(f"a reply part with a bad 'more': {key!r}")
            self.held.setdefault(key, []).extend(part[key])
            return None
        for k, items in self.held.items():
            tail = part.get(k, [])
            if not isinstance(tail, list):
                raise ValueError(f"the last reply part's {k!r} is not a list")
            part[k] = items + tail
        self.held = {}
        return part
