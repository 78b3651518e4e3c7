"""Taking over the programs a dead server managed.

The agent never closes its copy of the uffd, so after a crash every fault
on a reclaimed page waits, and nothing is unregistered. A new server reads
the journal (core/journal.py replays it into page maps and slot counts),
takes each live program's uffd back out of the process itself with
pidfd_getfd, and refines the page map with what is present now (pagemap):

* a page the dead server may still have been zapping (SWAP recorded, no
  SETTLED) is held as a batch whose zap was sent, until the agent says
  HELLO again: its zap thread is idle by then, and the REMOVEs it raised
  were read before it could finish;
* faults the dead server had read but not served wait for a wake; woken,
  they fault again and reach us.
"""
import logging
import os

from ..core import journal, protocol
from ..core.batch import Batch
from ..core.pages import PAGE, SWAPPED
from ..system import proc, procfs, uffd
from .journal_file import JournalFile
from .managed import ManagedProcess, Registry

log = logging.getLogger("uffdsrv.takeover")


class Takeover:
    def __init__(self, journal_file: JournalFile, swap, clients: Registry, adopt, harvest,
                 settle_batch):
        """adopt(client): start serving a taken-over client; harvest(): read
        every event the ring has delivered; settle_batch(client, batch):
        end a reclaim batch (ReclaimPath.settle)."""
        self.journal = journal_file
        self.swap = swap
        self.clients = clients
        self.adopt = adopt
        self.harvest = harvest
        self.settle_batch = settle_batch

    def recover(self) -> None:
        data = self.journal.read()
        if not data:
            return
        recovered, slots = journal.replay(data, self.swap.slots.nslots)
        self.swap.slots = slots
        self.journal.next_cid = max([0, *recovered]) + 1
        taken = 0
        for rec in recovered.values():
            if self._take_over(rec) is None:
                rec.pages.release_all(slots)
            else:
                taken += 1
        self.journal.rewrite(journal.snapshot(self.clients.journaled()))
        log.info("took over %d of %d programs from the journal; %d pages in swap",
                 taken, len(recovered), slots.used)

    def _take_over(self, rec: journal.Recovered) -> ManagedProcess | None:
        pid = rec.pid
        if not pid or procfs.starttime(pid) != rec.starttime:
            return None
        found = procfs.agent_uffd(pid)  # in the agent's zap helper, a CLONE_VM child
        if found is None:
            log.error("pid %d: no uffd found to take over; its reclaimed pages wait", pid)
            return None
        holder, num = found
        try:
            pidfd = proc.pidfd_open(pid)
            try:
                hfd = pidfd if holder == pid else proc.pidfd_open(holder)
                try:
                    fd = proc.pidfd_getfd(hfd, num, holder)
                finally:
                    if hfd != pidfd:
                        os.close(hfd)
            except OSError:
                os.close(pidfd)
                raise
        except OSError as e:
            log.error("pid %d: cannot take its uffd back: %s", pid, e)
            return None
        client = ManagedProcess(fd, pid)
        client.pidfd, client.cid, client.starttime = pidfd, rec.cid, rec.starttime
        client.private, client.beacon = rec.private, rec.beacon
        client.auto_maps = bool(rec.flags & protocol.HELLO_AUTO_MAPS)
        client.pages = rec.pages
        for r in client.pages.regions:
            try:
                present = proc.pagemap_present(pid, r.start, r.npages)
            except OSError:
                continue
            got = journal.refine(r, present, self.swap.slots)
            self.journal.extend(journal.free_records(rec.cid, r.start + got.freed * PAGE))
            if len(got.pending) or len(got.gaps):
                b = Batch.recovered(client.pages, r, got.pending, got.gaps)
                client.batches[b.id] = b
                client.recovering.append(b)
        self.adopt(client)
        ranges = [(r.start, r.npages * PAGE) for r in client.pages.regions]
        if client.beacon:
            ranges.append((client.beacon, PAGE))
        for start, length in ranges:
            try:
                uffd.wake(fd, [start], [length])
            except OSError:
                pass
        log.info("pid %d (%s): taken over, %d pages in swap", pid, client.comm,
                 client.pages.count(SWAPPED))
        return client

    def settle(self, client: ManagedProcess) -> None:
        """The agent is back: no zap of the dead server is still running,
        and the REMOVEs it raised were read before it could finish."""
        self.harvest()
        for b in client.recovering:
            if b.answer is not None:
                # awaited on the agent's old connection (reclaim's _late):
                # an agent says HELLO again only once that one is over
                b.answer.cancel()
            self.settle_batch(client, b, b.addrs.copy(), b.addrs.copy())
        client.recovering = []
        self.journal.flush()
