"""Prometheus metrics.

Names follow Prometheus conventions: the uffdsrv_ prefix, base units
(seconds, bytes), counters ending in _total, no unbounded label values.

Three kinds of figures:

* counters and histograms the server updates as it works (faults, events,
  reclaim, swap I/O, zaps, errors). Every label value a counter can take is
  created at start, so each series exists from the first scrape and rate()
  has data even for things that have not happened yet;
* the fault service time, observed per batch of faults on the fault path:
  a histogram of our own (_BatchHistogram) that adds n equal observations
  with one bisect instead of n locked calls;
* gauges and counters read at scrape time by collectors: the page maps
  (per live client, labelled pid and comm, and in total; a client's series
  vanish with it), the swap file and its RAM tier (the pool's stats, read
  from C in one call), the ring's submission counters and the machine's
  TLB shootdowns from /proc/interrupts.

The RAM tier caches the swap file (server/swap.py), so a swapped page is in
one of two places for a fault: `uffdsrv_swapped_pages{tier="ram"}` are the
slots with an entry in the pool, `{tier="disk"}` the rest. Its writeback
is free (every page is on the file before it enters the pool): an entry
the full pool gives up is counted as evicted. Memory saved is the swap
slots in use less the pool's own memory, which is the server's.

/metrics is served by prometheus-client's HTTP server on its own thread.
A scrape reads the server's state without locks: lists are copied first,
and a figure that changes under the scrape is off by one batch at most.
Nothing on the fault path ever waits for a scrape.
"""
import bisect
import collections
import logging
import threading

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import __version__
from ..core.pages import PAGE
from ..system import proc, uffd

log = logging.getLogger("uffdsrv.metrics")

EVENT_NAMES = {uffd.EVENT_PAGEFAULT: "pagefault", uffd.EVENT_FORK: "fork",
               uffd.EVENT_REMAP: "remap", uffd.EVENT_REMOVE: "remove",
               uffd.EVENT_UNMAP: "unmap"}
# how a fault was served: zero page, read back from swap, write-protect
# released; held until a reclaim batch settles, already loading (the COPY
# on its way wakes it), or outside every managed region
FAULT_KINDS = ("zero", "swap", "write_protect", "held", "loading", "unknown")
SERVED_KINDS = ("zero", "swap", "write_protect", "tier")  # tier: from the RAM pool
ERROR_KINDS = ("eagain", "uffd_read", "zeropage", "copy", "unprotect", "swap_read",
               "swap_write", "swap_full", "writeprotect", "reclaim", "zap", "protocol",
               "internal")
FAULT_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                 .1, .5)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # no *_created series: half the series, same information
        self.registry = r = CollectorRegistry()
        Info("uffdsrv_build", "Build information", registry=r).info({"version": __version__})
        self.faults_total = Counter("uffdsrv_faults_total",
                                    "Faults taken on managed memory, by how they were served",
                                    ["kind"], registry=r)
        self.events_total = Counter("uffdsrv_uffd_events_total", "uffd messages read, by type",
                                    ["type"], registry=r)
        self.errors_total = Counter("uffdsrv_errors_total", "Errors, by kind", ["kind"],
                                    registry=r)
        self.reclaimed_pages = Counter("uffdsrv_reclaimed_pages_total",
                                       "Pages reclaimed to swap or zero", registry=r)
        self.swapped_in_pages = Counter("uffdsrv_swapped_in_pages_total",
                                        "Pages faulted back in from swap", registry=r)
        self.swap_written_bytes = Counter("uffdsrv_swap_written_bytes_total",
                                          "Bytes written to the swap file", registry=r)
        self.swap_read_bytes = Counter("uffdsrv_swap_read_bytes_total",
                                       "Bytes read from the swap file", registry=r)
        self.batch_seconds = Histogram("uffdsrv_reclaim_batch_duration_seconds",
                                       "Reclaim batch duration, write-protect to settled",
                                       registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                                1, 2.5))
        self.zap_calls = Counter("uffdsrv_zap_calls_total",
                                 "Zap calls asked of agents (one process_madvise each)",
                                 registry=r)
        self.zap_ranges = Counter("uffdsrv_zap_ranges_total", "Ranges zapped", registry=r)
        self.ranges_per_call = Histogram("uffdsrv_zap_ranges_per_call", "Ranges per zap call",
                                         registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.zap_seconds = Histogram("uffdsrv_zap_duration_seconds",
                                     "Time from sending a batch's zap requests to every answer",
                                     registry=r,
                                     buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, .01, .025,
                                              .05, .1, .25, 1))
        self.clients = Gauge("uffdsrv_clients", "Connected managed processes", registry=r)
        # a page whose swap slot stayed unreadable: its fault ended in SIGBUS
        self.pages_lost = Counter("uffdsrv_pages_lost_to_io_errors_total",
                                  "Pages whose swap slot could not be read: their fault ended "
                                  "in SIGBUS", registry=r)
        self.kernel_feature = Gauge("uffdsrv_kernel_feature",
                                    "Kernel features probed at start: 1 present, 0 missing",
                                    ["feature"], registry=r)
        self.fault_seconds = _BatchHistogram(
            "uffdsrv_fault_duration_seconds",
            "Fault service time, from reading the fault to resolving it, by how it was served",
            "kind", SERVED_KINDS, FAULT_BUCKETS)
        r.register(self.fault_seconds)
        self._clients = self._swap = self._ring = None
        self._fault_kinds = {k: self.faults_total.labels(k) for k in FAULT_KINDS}
        self._event_types = {v: self.events_total.labels(n) for v, n in EVENT_NAMES.items()}
        self._event_types[None] = self.events_total.labels("other")
        self._error_kinds = {k: self.errors_total.labels(k) for k in ERROR_KINDS}
        self.pages_lost_total = 0
        self._swap_started: dict[int, float] = {}  # fault buffer -> time its fault was read
        self.http = None
        r.register(_StateCollector(self))

    def kernel(self, features: dict[str, bool]) -> None:
        for name, present in features.items():
            self.kernel_feature.labels(name).set(1 if present else 0)

    def observe(self, clients, swap, ring) -> None:
        """What the figures read at scrape time come from."""
        self._clients, self._swap, self._ring = clients, swap, ring

    def serve(self, host: str, port: int) -> None:
        got = start_http_server(port, addr=host, registry=self.registry)
        self.http = got[0] if isinstance(got, tuple) else None
        log.info("metrics on http://%s:%d/metrics", host, port)

    # --- the fault path ----------------------------------------------------
    def fault(self, kind: str, n: int = 1) -> None:
        child = self._fault_kinds.get(kind)
        if child is None:
            child = self._fault_kinds[kind] = self.faults_total.labels(kind)
        child.inc(n)

    def fault_served(self, kind: str, n: int, seconds: float) -> None:
        """n faults of one batch served after `seconds`."""
        if n > 0:
            self.fault_seconds.observe(kind, seconds, n)

    def swap_started(self, buf: int, t0: float) -> None:
        """A swap-in read into fault buffer buf, for a fault read at t0."""
        self._swap_started[buf] = t0

    def swap_done(self, buf: int, now: float) -> None:
        t0 = self._swap_started.pop(buf, None)
        if t0 is not None:
            self.fault_seconds.observe("swap", now - t0, 1)

    def events(self, ev: np.ndarray) -> None:
        if len(ev) and (ev == uffd.EVENT_PAGEFAULT).all():
            self._event_types[uffd.EVENT_PAGEFAULT].inc(len(ev))
            return
        for v, c in collections.Counter(ev.tolist()).items():
            child = self._event_types.get(v) or self._event_types[None]
            child.inc(c)

    def error(self, kind: str) -> None:
        child = self._error_kinds.get(kind)
        if child is None:
            child = self._error_kinds[kind] = self.errors_total.labels(kind)
        child.inc()

    # --- reclaim -------------------------------------------------------------
    def reclaimed(self, pages: int, seconds: float) -> None:
        self.reclaimed_pages.inc(pages)
        self.batch_seconds.observe(seconds)

    def page_lost(self, n: int = 1) -> None:
        self.pages_lost.inc(n)
        self.pages_lost_total += n  # for status

    def swapped_in(self, pages: int) -> None:
        self.swapped_in_pages.inc(pages)

    def swap_written(self, nbytes: int) -> None:
        self.swap_written_bytes.inc(nbytes)

    def swap_read(self, nbytes: int) -> None:
        self.swap_read_bytes.inc(nbytes)

    def zapped(self, ranges: int, per_call: list[int], seconds: float) -> None:
        self.zap_calls.inc(len(per_call))
        self.zap_ranges.inc(ranges)
        for n in per_call:
            self.ranges_per_call.observe(n)
        self.zap_seconds.observe(seconds)


class _BatchHistogram:
    """A labelled histogram for the fault path: observe(kind, v, n) adds n
    observations of v with one bisect and no lock (the event loop is the
    only writer; a scrape copies the counts, each a plain int)."""

    def __init__(self, name: str, doc: str, label: str, values, buckets):
        self.name, self.doc, self.label = name, doc, label
        self.bounds = list(buckets)
        self._counts = {v: [0] * (len(self.bounds) + 1) for v in values}
        self._sums = dict.fromkeys(values, 0.0)

    def observe(self, value: str, seconds: float, n: int = 1) -> None:
        counts = self._counts.get(value)
        if counts is None:
            counts = self._counts[value] = [0] * (len(self.bounds) + 1)
            self._sums[value] = 0.0
        counts[bisect.bisect_left(self.bounds, seconds)] += n
        self._sums[value] += seconds * n

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, counts in list(self._counts.items()):
            counts = list(counts)
            cum, buckets = 0, []
            for bound, c in zip([*map(float, self.bounds), float("inf")], counts):
                cum += c
                buckets.append((_fmt(bound), cum))
            fam.add_metric([value], buckets, self._sums.get(value, 0.0))
        yield fam


def _fmt(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _StateCollector:
    """Figures read at scrape time: the page maps (per live client and in
    total), the swap file, the ring, and the machine's TLB shootdowns.
    Per-client series exist only while their client does."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._lock = threading.Lock()

    def collect(self):
        with self._lock:  # two scrapes at once would only repeat the work
            yield from self._collect()

    def _collect(self):
        m = self.metrics
        labels = ["pid", "comm"]
        kinds = ("managed", "resident", "swapped")
        what = {"managed": "Memory managed", "resident": "Managed memory resident",
                "swapped": "Managed memory in the swap file"}
        per_client = {k: GaugeMetricFamily(f"uffdsrv_client_{k}_bytes",
                                           f"{what[k]}, per managed process", labels=labels)
                      for k in kinds}
        faults = CounterMetricFamily("uffdsrv_client_faults", "Faults read off the uffd, "
                                     "per managed process", labels=labels)
        refaults = CounterMetricFamily("uffdsrv_client_refaults", "Faults served from swap "
                                       "(pages that were needed again), per managed process",
                                       labels=labels)
        readahead = CounterMetricFamily("uffdsrv_client_readahead_pages", "Pages brought back "
                                        "from swap along with a faulting one, per managed "
                                        "process", labels=labels)
        misses = CounterMetricFamily("uffdsrv_client_readahead_misses", "Pages read ahead "
                                     "that the program never walked (their stream was "
                                     "dropped first), per managed process", labels=labels)
        budget = GaugeMetricFamily("uffdsrv_client_budget_bytes", "Budget of resident managed "
                                   "memory, per managed process that has one", labels=labels)
        totals = dict.fromkeys(kinds, 0)
        if m._clients is not None:
            for c in m._clients.all():
                if c.closed:
                    continue
                try:
                    s = c.status()
                except Exception:  # the page map changed under us: next scrape
                    continue
                for k in kinds:
                    totals[k] += s[f"{k}_bytes"]
                if c.pid is not None:  # a forked child not yet named counts in the totals
                    for k in kinds:
                        per_client[k].add_metric([str(c.pid), str(s["comm"])], s[f"{k}_bytes"])
                    lv = [str(c.pid), str(s["comm"])]
                    faults.add_metric(lv, s["faults_total"])
                    refaults.add_metric(lv, s["refaults_total"])
                    readahead.add_metric(lv, s["readahead_pages_total"])
                    misses.add_metric(lv, s["readahead_misses_total"])
                    if s["budget_bytes"] is not None:
                        budget.add_metric(lv, s["budget_bytes"])
        yield from per_client.values()
        yield faults
        yield refaults
        yield readahead
        yield misses
        yield budget
        for k in kinds:
            yield GaugeMetricFamily(f"uffdsrv_{k}_bytes", f"{what[k]}, all processes",
                                    value=totals[k])
        if m._swap is not None:
            swap = m._swap
            yield GaugeMetricFamily("uffdsrv_swap_size_bytes", "Swap file size", value=swap.size)
            yield GaugeMetricFamily("uffdsrv_swap_used_bytes", "Swap file bytes in use",
                                    value=swap.slots.used * PAGE)
            mode = GaugeMetricFamily("uffdsrv_swap_io_mode", "How swap I/O bypasses the page "
                                     "cache: 1 for the mode in use (direct, dontcache, "
                                     "buffered)", labels=["mode"])
            mode.add_metric([swap.io_mode], 1)
            yield mode
            yield from _tier_families(swap)
            ring = m._ring
            if ring is not None:
                yield CounterMetricFamily("uffdsrv_ring_submissions",
                                          "io_uring_enter calls that submitted entries",
                                          value=ring.submissions)
                yield CounterMetricFamily("uffdsrv_ring_entries_submitted",
                                          "io_uring entries submitted (reads, writes, cancels)",
                                          value=ring.entries_submitted)
        tlb = proc.tlb_shootdowns()
        if tlb is not None:
            yield CounterMetricFamily("uffdsrv_tlb_shootdowns",
                                      "TLB shootdown interrupts on this machine, all CPUs and "
                                      "all processes (/proc/interrupts)", value=tlb)


def _tier_families(swap):
    """The RAM tier's figures; pages by tier and memory saved also without
    one (every swapped page is then on disk)."""
    st = swap.tier_status()
    used = swap.slots.used
    in_ram = min(st["stored_pages"], used) if st else 0
    pool = st["pool_bytes"] if st else 0
    by_tier = GaugeMetricFamily("uffdsrv_swapped_pages", "Swapped pages (slots in use), by "
                                "where a fault finds them: ram (the compressed pool) or disk",
                                labels=["tier"])
    by_tier.add_metric(["ram"], in_ram)
    by_tier.add_metric(["disk"], used - in_ram)
    yield by_tier
    yield GaugeMetricFamily("uffdsrv_memory_saved_bytes", "Memory reclaim saved: swap slots "
                            "in use less the RAM tier's pool (the server's own memory)",
                            value=used * PAGE - pool)
    if st is None:
        return
    for name, key, doc in (
            ("cap_bytes", "cap_bytes", "The RAM tier's cap"),
            ("pool_bytes", "pool_bytes", "Memory the RAM tier holds (arena pages and index)"),
            ("stored_bytes", "stored_bytes", "Compressed bytes of the pages in the RAM tier"),
            ("same_filled_pages", "same_pages", "Pages in the RAM tier stored as one value "
             "(every 8-byte word equal)")):
        yield GaugeMetricFamily(f"uffdsrv_ram_tier_{name}", doc, value=st[key])
    ratio = st["compression_ratio"]
    yield GaugeMetricFamily("uffdsrv_ram_tier_compression_ratio", "Pages in the RAM tier "
                            "times 4 KiB over their compressed bytes (NaN: empty)",
                            value=float("nan") if ratio is None else ratio)
    for name, key, doc in (
            ("rejected_pages", "rejected_pages", "Pages that compressed too little to be "
             "stored (disk only)"),
            ("evicted_pages", "evicted_pages", "Entries the full pool gave up, oldest first "
             "(writeback: their pages are on disk already)"),
            ("dropped_pages", "dropped_pages", "Entries dropped because their slot was freed "
             "or written again"),
            ("hit_seconds", "hit_ns", "Time the fault engine spent serving pages from the "
             "RAM tier")):
        yield CounterMetricFamily(f"uffdsrv_ram_tier_{name}", doc,
                                  value=st[key] / 1e9 if key == "hit_ns" else st[key])
    lookups = CounterMetricFamily("uffdsrv_ram_tier_lookups", "Swap-ins looked up in the "
                                  "RAM tier: hit (decompressed, no I/O) or miss (read from "
                                  "disk)", labels=["result"])
    lookups.add_metric(["hit"], st["hits"])
    lookups.add_metric(["miss"], st["misses"])
    yield lookups
