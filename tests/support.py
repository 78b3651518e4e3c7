"""Helpers every kind of test shares, with nothing native or root behind
them: a region built from a string of page states, the string read back,
and one bounded wait."""
import threading
import time

import numpy as np

from uffdsrv.core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap, Region
from uffdsrv.core.slots import Slots

A = 0x10000  # where a test's first region starts unless it says otherwise
HELD = 99  # the batch id "H" pages carry

# E empty, R resident, I in flight, S swapped, L loading, H resident and
# held by a reclaim batch
CODE = {"E": EMPTY, "R": RESIDENT, "I": INFLIGHT, "S": SWAPPED, "L": LOADING, "H": RESIDENT}
NAME = {EMPTY: "E", RESIDENT: "R", INFLIGHT: "I", SWAPPED: "S", LOADING: "L"}


def region(pm: PageMap, spec: str, start: int = A, slots: Slots | None = None,
           heat=None, stamp=None) -> Region:
    """Add a region to `pm` laid out by `spec`, one letter a page. Its S and
    L pages each own a slot: allocated from `slots`, lowest first, or
    numbered 0, 1, ... in page order when no allocator is given."""
    r = pm.add(start, start + len(spec) * PAGE)
    r.state[:] = [CODE[c] for c in spec]
    owned = np.flatnonzero((r.state == SWAPPED) | (r.state == LOADING))
    r.slot[owned] = slots.alloc(len(owned)) if slots is not None else np.arange(len(owned))
    r.batch[[i for i, c in enumerate(spec) if c == "H"]] = HELD
    if heat is not None:
        r.heat[:] = heat
    if stamp is not None:
        r.stamp[:] = stamp
    return r


def page_map(*layout: tuple[int, str], slots: Slots | None = None) -> PageMap:
    """A page map of regions given as (start, spec)."""
    pm = PageMap()
    for start, spec in layout:
        region(pm, spec, start, slots)
    return pm


def states(r: Region) -> str:
    """The region's states as a spec string (H reads back as R)."""
    return "".join(NAME[int(s)] for s in r.state)


def wait_until(cond, timeout: float = 10.0, message="condition not reached",
               interval: float = 0.05):
    """Poll cond() until it returns something true, and return that. After
    `timeout` seconds fail, with the message (a string, or a callable for
    one worth computing only then, like a server's log) and what cond()
    last said; cond() is called once more at the deadline, so a late
    success still counts."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            got = cond()
            if got:
                return got
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (within {timeout:g} s; last: {got!r})")
        time.sleep(interval)


def background(fn):
    """Run fn in a daemon thread; -> (thread, {"value" or "error": ...})."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # reported by the caller
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
