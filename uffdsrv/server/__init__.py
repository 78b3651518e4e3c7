"""The asyncio shell: sockets, the ring, and the kernel calls, driven by
the decisions of uffdsrv.core. Each part is handed what it uses in its
constructor; none holds the server.

  daemon.py        the server: start, clients, fork and exit, shutdown
  managed.py       a managed process (its uffd, page map, agent link) and
                   the registry of all of them
  faults.py        where a fault is served: uffd events, zero pages, swap-ins
  read_errors.py   a swap read that failed: tries again, SIGBUS, the log limit
  reclaim.py       where a page is reclaimed: protect, copy out, write, zap
  regions.py       which memory of a process is managed
  budget_loop.py   holding each process to its budget; write tracking
  takeover.py      adopting the programs a dead server managed
  control.py       the unix socket: agents, the explicit API, the CLI
  admission.py     which uffd a peer may hand us
  peer.py          a peer's pidfd, taken at accept
  forks.py         programs without fork events: the device, pages back
                   before each fork
  zaps.py          waiting for zap answers; what a stop leaves registered
  requests.py      status, reclaim and limit requests
  journal_file.py  the journal on disk (its records: core/journal.py)
  compaction.py    when the journal may be rewritten as a snapshot
  limits.py        open files and the largest mapping managed
  swap.py          the swap file and its RAM tier
  buffers.py       the I/O staging buffers
  metrics.py       Prometheus metrics
"""
