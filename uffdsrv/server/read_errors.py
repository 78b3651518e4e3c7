"""A swap read that failed: who may pay for it, and when it is tried again.

The engine hands back a failed load (EIO, a short read) with the address
of its first page, its page count and the thread id of the fault that
started it (the kernel's UFFD_FEATURE_THREAD_ID; never 0 for a real
thread). Its pages are SWAPPED again and keep their slots. The cases:

* a fault some thread waits on (tid known): the thread sleeps in the
  kernel until the page is put in or it is woken. The page is tried
  again after 0.1 s, then 0.2 s, so that a hiccup of the disk shorter
  than that costs nothing; a slot that stays unreadable ends that fault
  in SIGBUS (UFFDIO_POISON), as the kernel's swap does, never wrong bytes
  and never a wait for ever. The poison marker stays in the page table:
  no later server can serve that page, so nothing but a waiting fault may
  come to it.
* a stop (stop()): from then on, no fault is tried again or poisoned;
  the program is left registered, the thread waiting, for the next
  server, whose takeover wakes it.
* a load nobody is known to wait on (tid 0): a restore's (a stop, a
  `restore`, a fork being prepared), or a retry that lost its thread.
  Nothing is poisoned and nothing is counted against the page: its pages
  stay swapped, the restore pass that asked does not load them again
  (restore_gaps), and they are woken, so that a thread that did wait on
  one faults again and is then a known waiter.

Every retry is a timer that must not outlive the swap file: close()
cancels them all before the file closes (its fd number is then free for
the next open() of the process, and a read there would serve another
file's bytes), and a timer that still fires finds the path closed.

Log lines are rate-limited per kind (core/ratelimit.py): a disk that fails
every read would otherwise write a line per try of every page; what is
held back is said in one summary line per period.
"""
import errno
import logging
import os

from ..core.pages import PAGE
from ..core.ratelimit import LogLimit
from ..core.swapin import MAX_READAHEAD
from ..system import kernel, uffd
from .managed import ManagedProcess

log = logging.getLogger("uffdsrv.faults")
SWAP_READ_TRIES = 3  # reads of an unreadable slot before its fault ends in SIGBUS
# try k+1 of a fault comes k * this many seconds after try k failed
# (UFFDSRV_READ_RETRY_SECONDS: a test makes the tries outlast a stop)
RETRY_SECONDS = float(os.environ.get("UFFDSRV_READ_RETRY_SECONDS", "") or 0.1)
LOG_BURST, LOG_PERIOD = 50, 10.0  # lines of one kind let through per period
# what a held-back line of each kind was about, for the summary
KINDS = {"retry": "failed reads tried again", "lost": "pages ended in SIGBUS",
         "left": "failed reads left swapped"}


class ReadErrors:
    def __init__(self, loop, metrics, retry):
        """retry(client, addr, flags, tid): serve a fault again."""
        self.loop, self.metrics, self.retry = loop, metrics, retry
        self.timers: set = set()  # retries of faults
        self.others: set = set()  # cancelled only at close
        self.closed = self.stopping = False
        self.limits = {k: LogLimit(LOG_BURST, LOG_PERIOD, loop.time) for k in KINDS}
        self._summary = None
        self._passes: dict[int, list] = {}  # id(client) -> addresses failed in its restore
        self._due: dict[int, set] = {}  # id(client) -> fault addresses a retry timer is for

    # --- restore passes ---------------------------------------------------------
    def begin_pass(self, client: ManagedProcess) -> list:
        """The failed loads of the client's restore pass go into the list
        returned (every failure then, a fault's too: the fault path owns it)."""
        return self._passes.setdefault(id(client), [])

    def end_pass(self, client: ManagedProcess) -> None:
        self._passes.pop(id(client), None)

    # --- a failed load ------------------------------------------------------------
    def failed(self, client: ManagedProcess, addr: int, npages: int, err: int,
               tid: int) -> None:
        # (the engine has counted the failed read: errors_total{kind="swap_read"})
        if self.closed:
            return
        why = errno.errorcode.get(-err, err) if err else "short read"
        in_pass = self._passes.get(id(client))
        if in_pass is not None:
            in_pass.append(addr)
        if not tid or self.stopping:
            self._say("left", "swap read of %d pages at %#x of pid %s: %s; left swapped "
                      "(%s)", npages, addr, client.pid, why,
                      "for the next server" if self.stopping else "no fault waits on them")
            if not tid:  # (a waiter woken in a stop would only fail again)
                self._wake(client, addr, MAX_READAHEAD)
            return
        tries = client.read_failures.pop(addr, 0) + 1
        if tries < SWAP_READ_TRIES:
            if len(client.read_failures) < 4096:
                client.read_failures[addr] = tries
            self._say("retry", "swap read of %d pages for %#x of pid %s: %s; trying again",
                      npages, addr, client.pid, why)
            self._due.setdefault(id(client), set()).add(addr)
            self.later(RETRY_SECONDS * tries, self._refault, client, addr, npages, tid)
            return
        self._say("lost", "pid %s: the swap slot of page %#x cannot be read (%s, %d tries): the "
                  "program gets SIGBUS there, as from the kernel's swap", client.pid, addr, why,
                  tries)
        try:
            kernel.fail_page(client.uffd, addr, client.pidfd,
                             kernel.current().features.get("uffdio_poison", False))
            self.metrics.page_lost()
        except OSError as e:
            log.error("pid %s: cannot end the fault at %#x: %s", client.pid, addr, e)
        if npages > 1:  # who waits on a page read ahead faults again, known then
            self.later(RETRY_SECONDS, self._wake, client, addr + PAGE, npages - 1)

    def _refault(self, client: ManagedProcess, start: int, npages: int, tid: int) -> None:
        """Pages of a swap-in that were not put back: serve the first now, for
        its thread, and wake who waits on the others (a woken first was read
        twice at once)."""
        due = self._due.get(id(client))
        if due is not None:
            due.discard(start)
            if not due:
                del self._due[id(client)]
        if self.closed or client.closed:
            return
        if npages > 1:
            self._wake(client, start + PAGE, npages - 1)
        self.retry(client, start, 0, tid)

    def _wake(self, client: ManagedProcess, start: int, npages: int) -> None:
        """Wake who waits on the pages, but for a fault whose next try is due
        (on a timer): woken, it would fault and spend that try now."""
        if self.closed or client.closed:
            return
        due = sorted(a for a in self._due.get(id(client), ())
                     if start <= a < start + npages * PAGE)
        lo = start
        for a in [*due, start + npages * PAGE]:
            if a > lo:
                try:
                    uffd.wake(client.uffd, [lo], [a - lo])
                except OSError:
                    pass
            lo = a + PAGE

    def later(self, delay: float, fn, *args, retry: bool = True) -> None:
        """fn(*args) in `delay` s, unless the path is closed by then (or, for a
        retry of a fault, stopping)."""
        timers = self.timers if retry else self.others

        def run():
            timers.discard(handle)
            if not (self.closed or (retry and self.stopping)):
                fn(*args)
        handle = self.loop.call_later(delay, run)
        timers.add(handle)

    def stop(self) -> None:
        """A stop begins: no fault is tried again or ends in SIGBUS from now
        on (whose thread waits stays waiting, for the next server, which
        wakes it); a restore's failed loads are left swapped as ever."""
        self.stopping = True
        for t in self.timers:
            t.cancel()
        self.timers.clear()
        self._due.clear()

    def close(self) -> None:
        """No retry after this: the swap file is about to close."""
        self.stop()
        self.closed = True
        for t in self.others:
            t.cancel()
        self.others.clear()
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        self._flush_summary()

    # --- the log ----------------------------------------------------------------
    def _say(self, kind: str, fmt: str, *args) -> None:
        held = self.limits[kind].allow()
        if held is None:
            if self._summary is None and not self.closed:
                self._summary = self.loop.call_later(LOG_PERIOD, self._summarize)
            return
        if held:  # the period turned over with lines held back: say so first
            log.error("%d more %s in the last %g s", held, KINDS[kind], LOG_PERIOD)
        log.error(fmt, *args)

    def _summarize(self) -> None:
        self._summary = None
        if self._flush_summary() and not self.closed:
            self._summary = self.loop.call_later(LOG_PERIOD, self._summarize)

    def _flush_summary(self) -> bool:
        """One line per kind for the lines held back; -> whether any were."""
        said = False
        for kind, what in KINDS.items():
            lim = self.limits[kind]
            if lim.held:
                log.error("%d more %s in the last %g s", lim.held, what, LOG_PERIOD)
                lim.held, said = 0, True
        return said


def restore_gaps(client: ManagedProcess, start: int, end: int, failed: list) -> list:
    """[start, end) less the windows of the loads that failed in this pass
    (a load takes the swapped pages of at most MAX_READAHEAD from its first,
    within its region), as (lo, hi) ranges in order."""
    cut = []
    for a in sorted(set(failed)):
        r, _ = client.pages.find(a)
        hi = a + MAX_READAHEAD * PAGE
        cut.append((a, min(hi, r.end) if r is not None else hi))
    out, lo = [], start
    for a, b in cut:
        if a > lo:
            out.append((lo, min(a, end)))
        lo = max(lo, b)
        if lo >= end:
            break
    if lo < end:
        out.append((lo, end))
    return [(a, b) for a, b in out if a < b]
