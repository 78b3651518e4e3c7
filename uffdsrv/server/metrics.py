"""Prometheus metrics. Names follow Prometheus conventions: uffdsrv_
prefix, base units, counters ending in _total. Per-client gauges carry the
pid only while that client lives."""
import collections

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .. import __version__
from ..system import uffd

EVENT_NAMES = {uffd.EVENT_PAGEFAULT: "pagefault", uffd.EVENT_FORK: "fork",
               uffd.EVENT_REMAP: "remap", uffd.EVENT_REMOVE: "remove",
               uffd.EVENT_UNMAP: "unmap"}


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        Info("uffdsrv_build", "Build information", registry=r).info({"version": __version__})
        self.faults_total = Counter("uffdsrv_faults_total", "Faults served, by how",
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
                                       "Reclaim batch duration", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                                1, 2.5))
        self.zap_calls = Counter("uffdsrv_zap_calls_total", "Zap requests sent to agents",
                                 registry=r)
        self.zap_ranges = Counter("uffdsrv_zap_ranges_total", "Ranges zapped", registry=r)
        self.ranges_per_call = Histogram("uffdsrv_zap_ranges_per_call", "Ranges per zap call",
                                         registry=r,
                                         buckets=(1, 2, 4, 8, 16, 64, 256, 1024))
        self.clients = Gauge("uffdsrv_clients", "Connected managed processes", registry=r)
        self._server = None
        self._fault_kinds = {}
        r.register(_StateCollector(self))

    def attach(self, server) -> None:
        self._server = server

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def fault(self, kind: str) -> None:
        child = self._fault_kinds.get(kind)
        if child is None:
            child = self._fault_kinds[kind] = self.faults_total.labels(kind)
        child.inc()

    def events(self, ev: np.ndarray) -> None:
        for v, c in collections.Counter(ev.tolist()).items():
            self.events_total.labels(EVENT_NAMES.get(v, "other")).inc(c)

    def error(self, kind: str) -> None:
        self.errors_total.labels(kind).inc()

    def reclaimed(self, pages: int, seconds: float) -> None:
        self.reclaimed_pages.inc(pages)
        self.batch_seconds.observe(seconds)

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


class _StateCollector:
    """Gauges read from the page maps at scrape time, so per-client series
    disappear with their client."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        server = self.metrics._server
        labels = ["pid", "comm"]
        fams = {k: GaugeMetricFamily(f"uffdsrv_client_{k}_bytes", f"{k} managed bytes",
                                     labels=labels)
                for k in ("managed", "resident", "swapped")}
        swap_size = GaugeMetricFamily("uffdsrv_swap_size_bytes", "Swap file size")
        swap_used = GaugeMetricFamily("uffdsrv_swap_used_bytes", "Swap file bytes in use")
        if server is not None:
            for c in list(server.clients.values()):
                s = c.status()
                for k, fam in fams.items():
                    fam.add_metric([str(c.pid), s["comm"]], s[f"{k}_bytes"])
            swap_size.add_metric([], server.swap.size)
            swap_used.add_metric([], server.swap.slots.used * 4096)
        yield from fams.values()
        yield swap_size
        yield swap_used
