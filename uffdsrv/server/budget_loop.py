"""Holding each managed process to its budget of resident memory.

Reclaim starts when a client's resident managed memory goes over its
budget and takes it a little further down (an eighth of the budget, at
most one batch), so that a program growing steadily is served a batch at
a time, not a page at a time.

No access bits reach us, so heat comes from what the server sees: pages
faulted back in, and writes. Writes are seen with synchronous
write-protect faults: every TRACK_WRITES_EVERY ticks the resident pages of
a budgeted program are protected; the first write to each then faults
once, and the fault path marks the page warm and lets the write through.
(UFFD_FEATURE_WP_ASYNC would cost no fault, but it applies to the whole
uffd and would let writes to pages in flight through, which reclaim
depends on holding.)
"""
import asyncio

import numpy as np

from ..core.pages import PAGE, RESIDENT
from ..core.ranges import byte_ranges
from ..system import uffd
from .managed import ManagedProcess, Registry
from .reclaim import BATCH_PAGES, NoAgent

TICK = 0.05  # seconds between two budget checks
TRACK_WRITES_EVERY = 20  # budget checks between two write-tracking sweeps


class BudgetLoop:
    def __init__(self, clients: Registry, reclaim):
        """reclaim(client, keep_bytes): the reclaim path's entry point."""
        self.clients = clients
        self.reclaim = reclaim

    async def run(self, interval: float = TICK) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            for c in self.clients.all():
                if c.budget is None or c.agent is None or c.reclaim_lock.locked():
                    continue
                if ticks % TRACK_WRITES_EVERY == 0:
                    self.track_writes(c)
                resident = c.pages.count(RESIDENT) * PAGE
                if resident > c.budget:
                    ahead = min(c.budget // 8, BATCH_PAGES * PAGE)
                    asyncio.ensure_future(self._enforce(c, max(0, c.budget - ahead)))

    @staticmethod
    def track_writes(client: ManagedProcess) -> None:
        for r in client.pages.regions:
            idx = np.flatnonzero((r.state == RESIDENT) & (r.batch == 0))
            if len(idx):
                starts, lens = byte_ranges(r.start, idx)
                try:
                    uffd.writeprotect(client.uffd, starts, lens, True)
                except OSError:
                    return

    async def _enforce(self, client: ManagedProcess, keep: int) -> None:
        try:
            await self.reclaim(client, keep)
        except NoAgent:
            pass
