"""Waiting for the agent's answer to a zap.

The agent's zap (MADV_DONTNEED of the batch's ranges, in the managed
process) raises one REMOVE per range on the uffd, and the zapping thread
blocks until the server has read each; only then does ZAP_DONE go out. So
when the answer arrives, every REMOVE of the ranges it reports done is in
the ring already, read if not yet applied: harvest, then the batch may
settle. A range the kernel refused (EINVAL on an mlocked VMA: DONTNEED is
checked against VM_LOCKED before any REMOVE is raised) raised nothing, and
its pages are still in flight, so they go back resident.

The answer comes only when the agent's thread runs: never for a program
that is stopped (SIGSTOP, a frozen cgroup, a debugger) until it is let go,
late for one starved of CPU. A ZAP in its socket cannot be taken back, so a
batch whose answer is late keeps everything that makes the late zap
harmless: its slots (the bytes the pages will be read back from) and its
expected REMOVEs (so the zap's events read as ours, not as the program's
own DONTNEED, which would make the pages zeros). It gives back what other
clients need (the staging buffer went back after the write; the request,
and the client's reclaim lock, end at ZAP_TIMEOUT) and waits in
`client.recovering`, where the client's next HELLO also finds it.

A graceful stop (daemon.shutdown) leans on the same facts: it waits for
the zaps sent, puts pages back while they come, and leaves registered
what it cannot let go safely (must_stay), for the next server.
"""
import asyncio
import errno
import logging
import os
import time

import numpy as np

from ..core.batch import Batch
from ..core.pages import EMPTY, LOADING, PAGE, SWAPPED
from .managed import ManagedProcess

log = logging.getLogger("uffdsrv.reclaim")
# seconds a batch waits for ZAP_DONE before the request goes on without it
ZAP_TIMEOUT = float(os.environ.get("UFFDSRV_ZAP_TIMEOUT", "") or 10.0)


def stalled(client: ManagedProcess, b: Batch, metrics) -> None:
    """The answer is late: the batch waits for it aside (said once per
    stall of the client, not per batch)."""
    if not client.recovering:
        log.warning("pid %s has not answered its zap for %g s (stopped, frozen or starved?): "
                    "its %d pages wait in flight for the answer, and it is not reclaimed "
                    "until then", client.pid, ZAP_TIMEOUT, len(b))
        metrics.error("zap_timeout")
    client.recovering.append(b)


async def removes_read(ring, client: ManagedProcess, b: Batch, live, results, zstarts,
                       zlens, metrics) -> np.ndarray | None:
    """The agent has answered; make sure the REMOVE of every range it
    zapped has been applied before the batch settles (yield a few times
    should a completion still be on its way). Returns the addresses of
    the batch's pages that were live at the zap, or None if the REMOVEs
    of the ranges done never came."""
    done_ranges = 0
    for (_bytes, ranges_done, error), i in zip(results, range(0, len(zstarts), 1024)):
        done_ranges = i + ranges_done
        if error:
            log.warning("zap for pid %s stopped after %d ranges: %s", client.pid,
                        done_ranges, errno.errorcode.get(error, error))
            metrics.error("zap")
            break
    zapped_end = 0
    if done_ranges:
        zapped_end = int(zstarts[done_ranges - 1] + zlens[done_ranges - 1])
    addrs = b.addrs[live]
    want = addrs[addrs < zapped_end]
    for attempt in range(2000):
        ring.harvest()
        if not expecting(client, want):
            return addrs
        await asyncio.sleep(0 if attempt < 1000 else 0.001)
    log.error("pid %s: REMOVE events of a zap never arrived", client.pid)
    return None


def expecting(client: ManagedProcess, addrs: np.ndarray) -> bool:
    """Whether a REMOVE of ours is still due on one of the sorted pages."""
    if not len(addrs):
        return False
    r, i = client.pages.find(int(addrs[0]))
    if r is None:
        return False
    idx = (addrs - r.start) // PAGE
    idx = idx[(idx >= 0) & (idx < r.npages)]
    return bool(np.any(r.expect[idx] > 0))


def zapped(metrics, zstarts, t_zap: float) -> None:
    """The zap's calls (1024 ranges each) and its time, for the metrics."""
    metrics.zapped(len(zstarts), [len(zstarts[i:i + 1024]) for i in range(0, len(zstarts), 1024)],
                   time.monotonic() - t_zap)


def dropped(pages, addrs: np.ndarray) -> int:
    """Of the pages at the sorted `addrs` (in flight when the zap went),
    those the zap dropped: swapped now, or empty (all zeros, no slot).
    Pages a refused range kept are still in flight: not reclaimed."""
    st = pages.states_at(addrs)
    return int(np.count_nonzero((st == SWAPPED) | (st == EMPTY)))


def zap_outstanding(client: ManagedProcess) -> bool:
    """Whether a zap of the client's may still run: sent, and its batch
    not settled."""
    return any(b.zap_sent and not b.settled for b in client.batches.values())


def must_stay(client: ManagedProcess) -> str | None:
    """Why a stopping server must leave the client registered, if it must.
    Unregistered memory raises no events and no faults: a late zap there
    drops the only copy of the pages, and a page still swapped reads as
    zeros. Registered, with the agent's copy of the uffd open, both wait
    for the next server, which takes over from the journal."""
    if zap_outstanding(client):
        return "did not answer its zap"
    left = client.pages.count(SWAPPED) + client.pages.count(LOADING)
    if left:
        return f"has {left} pages that could not be put back"
    return None


async def wait_for_zaps(clients, timeout: float = 5.0) -> None:
    """At a stop: wait, bounded, for the answer to every zap sent, the loop
    still reading the uffds (the zapping threads block on their REMOVEs
    until those are read; a reconnecting agent's HELLO settles what a dead
    server's zaps left). A ZAP in a program's socket cannot be taken back,
    and one that runs after its ranges were unregistered drops the only
    copy of its pages."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and any(zap_outstanding(c) for c in clients.live()):
        await asyncio.sleep(0.01)


async def put_back(restore, client: ManagedProcess, stall: float = 2.0) -> int:
    """At a stop: restore(client) (the fault path's), given up once no page
    came back for `stall` seconds (a disk that fails every read: the fault
    path tries each again). What is left stays swapped: must_stay() then
    keeps the program registered for the next server. -> pages put back."""
    task = asyncio.ensure_future(restore(client))
    last = None
    while not task.done():
        await asyncio.wait([task], timeout=stall)
        left = client.pages.count(SWAPPED) + client.pages.count(LOADING)
        if not task.done() and left == last:
            task.cancel()
            log.error("pid %s: %d pages did not come back in %g s; giving up on them",
                      client.pid, left, stall)
            return 0
        last = left
    return task.result()
