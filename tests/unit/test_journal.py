"""The journal (core/journal.py): what each record does on replay, the
records a snapshot writes and the map they rebuild, the run-length records
of a batch, and a journal cut in the middle of its last record (a server
killed inside write(2))."""
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdsrv.core import journal as j
from uffdsrv.core.pages import EMPTY, INFLIGHT, LOADING, PAGE, RESIDENT, SWAPPED, PageMap
from uffdsrv.core.slots import Slots

from ..support import A, region, states

NSLOTS = 64


def log(*records) -> bytes:
    return b"".join(j.pack(*r) for r in records)


def client(cid=1, pid=100, start=A, npages=8):
    """CLIENT, AGENT and REGION records of one client with one region."""
    return [(j.CLIENT, cid, pid, 7000 + cid, 4), (j.AGENT, cid, 0x7F00_0000_0000,
                                                   0x7F00_0001_0000, 0x7F00_0002_0000),
            (j.REGION, cid, start, start + npages * PAGE)]


def replay(*records, nslots=NSLOTS):
    return j.replay(log(*records), nslots)


def pg(i: int) -> int:
    return A + i * PAGE


def refs(slots: Slots) -> dict[int, int]:
    return {int(s): int(slots.refs[s]) for s in np.flatnonzero(slots.refs)}


def decode(records: list[bytes]) -> list[tuple]:
    return [tuple(j.REC.unpack(r)) for r in records]


# --- each record --------------------------------------------------------------------
def test_client_agent_region():
    clients, slots = replay(*client(npages=4))
    c = clients[1]
    assert (c.cid, c.pid, c.starttime, c.flags) == (1, 100, 7001, 4)
    assert c.private == (0x7F00_0000_0000, 0x7F00_0001_0000)
    assert c.beacon == 0x7F00_0002_0000
    [r] = c.pages.regions
    assert (r.start, r.npages, states(r)) == (A, 4, "EEEE")
    assert slots.used == 0 and slots.nslots == NSLOTS


def test_region_over_a_managed_range_adds_only_the_gaps():
    clients, _ = replay(*client(npages=4), (j.REGION, 1, pg(2), pg(6)))
    assert [(r.start, r.npages) for r in clients[1].pages.regions] == [(A, 4), (pg(4), 2)]


def test_swap_takes_slots_in_order_and_waits_for_its_zap():
    clients, slots = replay(*client(), (j.SWAP, 1, pg(2), 3, 10))
    [r] = clients[1].pages.regions
    assert states(r) == "EESSSEEE"
    assert r.slot.tolist() == [-1, -1, 10, 11, 12, -1, -1, -1]
    assert r.expect.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # no SETTLED yet
    assert refs(slots) == {10: 1, 11: 1, 12: 1} and slots.used == 3


def test_swap_across_two_regions_continues_the_slot_run():
    records = [*client(npages=2), (j.REGION, 1, pg(2), pg(4)), (j.SWAP, 1, pg(1), 2, 5)]
    clients, _ = replay(*records)
    a, b = clients[1].pages.regions
    assert (a.slot.tolist(), b.slot.tolist()) == ([-1, 5], [6, -1])


def test_swap_past_the_last_slot_is_cut_there():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 4, NSLOTS - 2))
    [r] = clients[1].pages.regions
    assert states(r) == "SSEEEEEE" and r.slot.tolist()[:3] == [NSLOTS - 2, NSLOTS - 1, -1]
    assert slots.used == 2


def test_swap_again_releases_the_old_slots():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 2, 0), (j.SETTLED, 1, A, 2),
                            (j.SWAP, 1, A, 2, 8))
    [r] = clients[1].pages.regions
    assert r.slot.tolist()[:2] == [8, 9] and refs(slots) == {8: 1, 9: 1}


def test_settled_clears_the_pending_zap():
    clients, _ = replay(*client(), (j.SWAP, 1, A, 4, 0), (j.SETTLED, 1, pg(1), 2))
    [r] = clients[1].pages.regions
    assert r.expect.tolist()[:4] == [1, 0, 0, 1]
    assert states(r)[:4] == "SSSS"


def test_free_gives_the_slots_back():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 4, 0), (j.FREE, 1, pg(1), 2))
    [r] = clients[1].pages.regions
    assert states(r) == "SEESEEEE" and r.slot.tolist()[:4] == [0, -1, -1, 3]
    assert r.expect.tolist()[:4] == [1, 0, 0, 1]
    assert refs(slots) == {0: 1, 3: 1} and slots.used == 2


def test_unmap_drops_the_pages_and_their_slots():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 8, 0), (j.UNMAP, 1, pg(2), pg(5)))
    a, b = clients[1].pages.regions
    assert (a.start, states(a), b.start, states(b)) == (A, "SS", pg(5), "SSS")
    assert sorted(refs(slots)) == [0, 1, 5, 6, 7]


def test_remap_moves_states_and_slots():
    dst = A + 0x100000
    clients, slots = replay(*client(npages=4), (j.SWAP, 1, pg(1), 2, 20),
                            (j.REMAP, 1, A, dst, 4 * PAGE))
    [r] = clients[1].pages.regions
    assert (r.start, states(r), r.slot.tolist()) == (dst, "ESSE", [-1, 20, 21, -1])
    assert refs(slots) == {20: 1, 21: 1}


def test_fork_shares_slots_and_bind_names_the_child():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 3, 0), (j.SETTLED, 1, A, 3),
                            (j.FORK, 0, 2, 1), (j.BIND, 2, 200, 9000))
    parent, child = clients[1], clients[2]
    assert (child.pid, child.starttime) == (200, 9000)
    assert (child.flags, child.private, child.beacon) == (parent.flags, parent.private,
                                                          parent.beacon)
    [r] = child.pages.regions
    assert states(r) == "SSSEEEEE" and r.slot.tolist()[:3] == [0, 1, 2]
    assert refs(slots) == {0: 2, 1: 2, 2: 2} and slots.used == 3


def test_fork_of_an_unknown_parent_is_an_empty_child():
    clients, _ = replay((j.FORK, 0, 5, 42), (j.BIND, 5, 500, 1))
    assert clients[5].pid == 500 and clients[5].pages.regions == []


def test_exit_frees_only_what_the_exited_side_held():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 3, 0), (j.FORK, 0, 2, 1),
                            (j.EXIT, 1))
    assert sorted(clients) == [2]
    assert refs(slots) == {0: 1, 1: 1, 2: 1}
    clients, slots = replay(*client(), (j.SWAP, 1, A, 3, 0), (j.FORK, 0, 2, 1),
                            (j.EXIT, 1), (j.EXIT, 2))
    assert clients == {} and slots.used == 0 and refs(slots) == {}


def test_client_again_for_a_cid_starts_it_over():
    clients, slots = replay(*client(), (j.SWAP, 1, A, 3, 0), (j.CLIENT, 1, 101, 5, 0))
    c = clients[1]
    assert (c.pid, c.starttime, c.pages.regions) == (101, 5, [])
    assert slots.used == 0


def test_records_of_an_unknown_cid_change_nothing():
    clients, slots = replay(*client(), (j.SWAP, 9, A, 3, 0), (j.REGION, 9, A, pg(4)),
                            (j.EXIT, 9), (j.BIND, 9, 1, 1))
    assert sorted(clients) == [1] and slots.used == 0


def test_records_of_two_clients_stay_apart():
    clients, slots = replay(*client(1), *client(2, pid=300), (j.SWAP, 1, A, 2, 0),
                            (j.SWAP, 2, pg(4), 2, 2), (j.UNMAP, 2, A, pg(8)))
    [r] = clients[1].pages.regions
    assert states(r) == "SSEEEEEE"
    assert clients[2].pages.regions == [] and refs(slots) == {0: 1, 1: 1}


# --- a torn final record --------------------------------------------------------------
JOURNAL = [*client(), (j.SWAP, 1, A, 4, 0), (j.SETTLED, 1, A, 4), (j.FREE, 1, pg(3), 1),
           (j.SWAP, 1, pg(5), 2, 4)]


@pytest.mark.parametrize("cut", [1, 8, j.REC.size // 2, j.REC.size - 1])
def test_a_torn_last_record_replays_everything_before_it(cut):
    data = log(*JOURNAL)
    whole = len(data) - j.REC.size
    clients, slots = j.replay(data[:whole + cut], NSLOTS)
    [r] = clients[1].pages.regions
    assert states(r) == "SSSEEEEE"  # the last SWAP (pages 5, 6) is not there
    assert refs(slots) == {0: 1, 1: 1, 2: 1}
    assert dump(clients, slots) == dump(*j.replay(data[:whole], NSLOTS))


def test_the_whole_journal_has_the_last_record():
    clients, _ = j.replay(log(*JOURNAL), NSLOTS)
    assert states(clients[1].pages.regions[0]) == "SSSEESSE"


def test_an_empty_or_shorter_than_a_record_journal_is_nothing():
    for data in (b"", log(*client())[:j.REC.size - 1]):
        clients, slots = j.replay(data, NSLOTS)
        assert clients == {} and slots.used == 0


# --- records of a batch ---------------------------------------------------------------
def test_swap_records_break_where_address_or_slot_is_not_next():
    recs = j.swap_records(3, [pg(0), pg(1), pg(2), pg(4), pg(5)], [5, 6, 9, 10, 11])
    assert decode(recs) == [(j.SWAP, 3, pg(0), 2, 5), (j.SWAP, 3, pg(2), 1, 9),
                            (j.SWAP, 3, pg(4), 2, 10)]
    assert j.swap_records(3, [], []) == []


def test_settled_records_break_where_address_is_not_next():
    recs = j.settled_records(3, [pg(0), pg(1), pg(3), pg(7), pg(8)])
    assert decode(recs) == [(j.SETTLED, 3, pg(0), 2, 0), (j.SETTLED, 3, pg(3), 1, 0),
                            (j.SETTLED, 3, pg(7), 2, 0)]
    assert j.settled_records(3, []) == []


def test_free_records_replay_as_the_frees_they_say():
    recs = j.free_records(1, [pg(1), pg(2), pg(6)])
    assert decode(recs) == [(j.FREE, 1, pg(1), 2, 0), (j.FREE, 1, pg(6), 1, 0)]
    clients, slots = j.replay(log(*client(), (j.SWAP, 1, A, 8, 0)) + b"".join(recs), NSLOTS)
    assert states(clients[1].pages.regions[0]) == "SEESSSES"
    assert sorted(refs(slots)) == [0, 3, 4, 5, 7]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_swap_records_are_the_fewest_runs_that_say_every_page(steps):
    """steps: for each page after the first, (address follows, slot follows)."""
    addrs, slots = [A], [3]
    for next_addr, next_slot in steps:
        addrs.append(addrs[-1] + (PAGE if next_addr else 3 * PAGE))
        slots.append(slots[-1] + (1 if next_slot else 7))
    recs = [j.REC.unpack(r) for r in j.swap_records(1, addrs, slots)]
    said = [(a + i * PAGE, s0 + i) for op, _, a, n, s0 in recs for i in range(n)]
    assert said == list(zip(addrs, slots))
    breaks = sum(1 for na, ns in steps if not (na and ns))
    assert len(recs) == breaks + 1


# --- snapshot ---------------------------------------------------------------------------
@dataclass
class Live:
    """What snapshot() reads of a server's client."""
    cid: int
    pid: int
    starttime: int
    flags: int
    private: tuple
    beacon: int
    pages: PageMap


def dump(clients: dict, slots: Slots):
    """Everything replay rebuilds, as plain values to compare."""
    return ({cid: (c.pid, c.starttime, c.flags, c.private, c.beacon,
                   [(r.start, r.state.tolist(), r.slot.tolist(), r.expect.tolist())
                    for r in c.pages.regions])
             for cid, c in sorted(clients.items())}, refs(slots), slots.used)


def test_snapshot_writes_swapped_pages_settled_and_held_ones_pending():
    slots, pm = Slots(NSLOTS), PageMap()
    r = region(pm, "RSLESR", A, slots)          # S and L own slots 0, 1, 2
    held = np.array([0, 5])                     # a batch holds pages 0 and 5
    r.state[held] = INFLIGHT
    r.batch[held] = 7
    r.slot[held] = slots.alloc(2)               # written to 3, 4; zap on its way
    r.batch[1] = 7                              # page 1's zap is done: SWAPPED, held
    live = Live(4, 400, 1234, 1, (0x1000, 0x2000), 0x3000, pm)
    clients, got = j.replay(j.snapshot([live]), NSLOTS)
    c = clients[4]
    assert (c.pid, c.starttime, c.flags, c.private, c.beacon) == (400, 1234, 1, (0x1000, 0x2000),
                                                                  0x3000)
    [g] = c.pages.regions
    assert states(g) == "SSSESS"
    assert g.slot.tolist() == [3, 0, 1, -1, 2, 4]
    # held pages replay pending: a restarted server must not take them for
    # pages faulted back in while their zap may still come
    assert g.expect.tolist() == [1, 1, 0, 0, 0, 1]
    assert refs(got) == refs(slots)


def test_snapshot_of_nothing_is_empty():
    assert j.snapshot([]) == b""
    clients, slots = j.replay(j.snapshot([Live(1, 1, 1, 0, (0, 0), 0, PageMap())]), NSLOTS)
    assert clients[1].pages.regions == [] and slots.used == 0


# A live page, as the server can hold it: E empty, R resident, S swapped, L
# loading, H resident in a batch, I in flight with its slot written, Z in
# flight with no slot (all zeros), T swapped by a batch not settled yet.
KINDS = "ERSLHIZT"
HELD = {"H", "I", "Z", "T"}
STATE = {"E": EMPTY, "R": RESIDENT, "S": SWAPPED, "L": LOADING, "H": RESIDENT,
         "I": INFLIGHT, "Z": INFLIGHT, "T": SWAPPED}
WITH_SLOT = {"S", "L", "I", "T"}


@st.composite
def live_clients(draw):
    """One to three clients, each with up to three regions of live pages,
    their slots drawn in any order from one allocator; maybe a forked
    child of the first."""
    slots = Slots(NSLOTS * 4)
    order = iter(draw(st.permutations(range(slots.nslots))))
    out = []
    for cid in range(1, draw(st.integers(1, 3)) + 1):
        pm = PageMap()
        starts = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True))
        for k in sorted(starts):
            spec = draw(st.text(KINDS, min_size=1, max_size=12))
            start = A + k * 16 * PAGE
            r = pm.add(start, start + len(spec) * PAGE)
            for i, kind in enumerate(spec):
                r.state[i] = STATE[kind]
                r.batch[i] = 3 if kind in HELD else 0
                if kind in WITH_SLOT:
                    s = next(order)
                    r.slot[i] = s
                    slots.refs[s] += 1
        out.append(Live(cid, 100 + cid, 50 + cid, cid % 2, (cid << 20, (cid + 1) << 20),
                        cid << 24, pm))
    slots.used = int(np.count_nonzero(slots.refs))
    if draw(st.booleans()):
        parent = out[0]
        out.append(Live(len(out) + 1, 999, 1, parent.flags, parent.private, parent.beacon,
                        parent.pages.fork(slots)))
    return out, slots


def expected(live: list[Live], nslots: int):
    """What replaying a snapshot of `live` must give: swapped and loading
    pages and held pages with a slot come back SWAPPED in their slots, held
    ones with their zap pending; every other page is EMPTY (a restarted
    server learns what is present from the process)."""
    clients, counts = {}, {}
    for c in live:
        regions = []
        for r in c.pages.regions:
            held = r.batch != 0
            kept = ((r.state >= SWAPPED) & ~held) | (
                held & (r.slot >= 0) & ((r.state == INFLIGHT) | (r.state == SWAPPED)))
            st_ = np.where(kept, SWAPPED, EMPTY)
            sl = np.where(kept, r.slot, -1)
            for s in sl[sl >= 0].tolist():
                counts[s] = counts.get(s, 0) + 1
            regions.append((r.start, st_.tolist(), sl.tolist(),
                            (kept & held).astype(int).tolist()))
        clients[c.cid] = (c.pid, c.starttime, c.flags, c.private, c.beacon, regions)
    return clients, counts, len(counts)


@settings(max_examples=150, deadline=None)
@given(live_clients())
def test_snapshot_then_replay_rebuilds_the_live_maps_and_refcounts(state):
    live, slots = state
    got = dump(*j.replay(j.snapshot(live), slots.nslots))
    assert got == expected(live, slots.nslots)
    # every reference the live maps hold on a slot is there again, no more
    assert got[1] == refs(slots)


# --- journals as a server writes them ---------------------------------------------------
@st.composite
def journals(draw):
    """A journal a server could have written: clients come and go, fork,
    swap pages into slots never used before, free, unmap and remap them."""
    records, alive, next_slot, cid = [], [], 0, 0
    for _ in range(draw(st.integers(1, 40))):
        op = draw(st.sampled_from(["client", "swap", "swap", "settled", "free", "unmap",
                                   "remap", "fork", "exit", "region"]))
        if op == "client" or not alive:
            cid += 1
            records += client(cid, pid=100 + cid, npages=draw(st.integers(1, 16)))
            alive.append(cid)
            continue
        c = draw(st.sampled_from(alive))
        lo = draw(st.integers(0, 20))
        n = draw(st.integers(1, 8))
        if op == "swap":
            records.append((j.SWAP, c, pg(lo), n, next_slot))
            next_slot += n
        elif op == "settled":
            records.append((j.SETTLED, c, pg(lo), n))
        elif op == "free":
            records.append((j.FREE, c, pg(lo), n))
        elif op == "unmap":
            records.append((j.UNMAP, c, pg(lo), pg(lo + n)))
        elif op == "region":
            records.append((j.REGION, c, pg(lo), pg(lo + n)))
        elif op == "remap":
            to = 40 + draw(st.integers(0, 20))  # never overlaps the source
            records.append((j.REMAP, c, pg(lo), pg(to), n * PAGE))
        elif op == "fork":
            cid += 1
            records += [(j.FORK, 0, cid, c), (j.BIND, cid, 100 + cid, 1)]
            alive.append(cid)
        elif op == "exit":
            records.append((j.EXIT, c))
            alive.remove(c)
    return records, next_slot


@settings(max_examples=150, deadline=None)
@given(journals(), st.data())
def test_any_cut_replays_the_whole_records_before_it(journal, data):
    records, used = journal
    raw = log(*records)
    cut = data.draw(st.integers(0, len(raw)))
    whole = cut - cut % j.REC.size
    assert dump(*j.replay(raw[:cut], used + 8)) == dump(*j.replay(raw[:whole], used + 8))
    assert dump(*j.replay(raw[:whole], used + 8)) == dump(*replay(*records[:whole // j.REC.size],
                                                                  nslots=used + 8))


@settings(max_examples=150, deadline=None)
@given(journals())
def test_replay_holds_exactly_the_references_its_maps_name(journal):
    records, used = journal
    clients, slots = j.replay(log(*records), used + 8)
    named: dict[int, int] = {}
    for c in clients.values():
        for r in c.pages.regions:
            assert set(np.unique(r.state).tolist()) <= {EMPTY, SWAPPED}
            assert ((r.state == SWAPPED) == (r.slot >= 0)).all()
            for s in r.slot[r.slot >= 0].tolist():
                named[s] = named.get(s, 0) + 1
    assert refs(slots) == named and slots.used == len(named)


@settings(max_examples=150, deadline=None)
@given(journals())
def test_snapshot_of_a_replayed_journal_replays_the_same(journal):
    """Compaction at takeover: the snapshot of what was replayed rebuilds
    it (zaps pending at the crash come back settled: the replayed clients
    hold no batch)."""
    records, used = journal
    clients, slots = j.replay(log(*records), used + 8)
    again = dump(*j.replay(j.snapshot(clients.values()), used + 8))
    want = dump(clients, slots)
    for cid, c in want[0].items():
        want[0][cid] = c[:5] + ([(s, st_, sl, [0] * len(e)) for s, st_, sl, e in c[5]],)
    assert again == want
