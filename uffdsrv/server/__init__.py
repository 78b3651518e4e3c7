"""The asyncio shell: sockets, the ring, and the kernel calls, driven by
the decisions of uffdsrv.core.

  daemon.py    the server: start, clients, shutdown
  managed.py   a managed process: its uffd, page map and agent link
  control.py   the unix socket: agents, the explicit API, the CLI
  faults.py    where a fault is served: uffd events, zero pages, swap-ins
  reclaim.py   where a page is reclaimed: protect, copy out, write, zap
  swap.py      the swap file and the I/O staging buffers
"""
