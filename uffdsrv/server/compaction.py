"""When the journal may be rewritten from the live state.

A snapshot (core/journal.py) holds what a page map says now; the records
a reclaim batch in progress writes later (its SWAP records at the zap, its
SETTLED or FREE ones after) are appended to whatever file is there then.
A batch between taking its pages and its zap has state a snapshot cannot
say (slots whose write may not be done), so no rewrite while one runs.

A batch held for a late zap answer (`client.recovering`: the zap was sent,
its SWAP and ZAP records committed, the agent of a stopped program not
answering) is another matter: the snapshot writes its pages with a slot as
pending and its slotless zapped pages as ZAP records, exactly what a stop
leaves for the next server, and its settling later only appends. So held
batches do not hold compaction up: one frozen program would otherwise let
the journal of every other grow without bound.
"""
import asyncio
import os

from ..core import journal
from .journal_file import COMPACT_BYTES

COMPACT_EVERY = 1.0  # seconds between two looks at the journal's size
# the size past which it is rewritten (UFFDSRV_COMPACT_BYTES: tests make it small)
COMPACT_AT = int(os.environ.get("UFFDSRV_COMPACT_BYTES", "") or COMPACT_BYTES)


def snapshot_safe(clients) -> bool:
    """No batch is in progress: every batch of every client is held for
    its zap's answer, or there is none."""
    for c in clients.all():
        held = {id(b) for b in c.recovering}
        if any(id(b) not in held for b in c.batches.values()):
            return False
    return True


def compact(jf, clients) -> bool:
    """Rewrite the journal from the live state if no batch is in progress."""
    if not snapshot_safe(clients):
        return False
    jf.rewrite(journal.snapshot(clients.journaled()))
    return True


async def compact_forever(jf, clients, threshold: int = COMPACT_AT) -> None:
    """Rewrite the journal once it has grown past `threshold` bytes."""
    while True:
        await asyncio.sleep(COMPACT_EVERY)
        if jf.size > threshold:
            compact(jf, clients)
