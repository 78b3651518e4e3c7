"""Explicit agent API for Python programs that choose what uffdsrv manages.

The agent is the C library ``uffdsrv/_bin/libuffdsrv_agent.so`` (built by
``make -C native``); this module loads it with cffi in ABI mode, so it needs
no compiler at import time. If the process was started with
``LD_PRELOAD=.../libuffdsrv_agent.so``, the dynamic loader hands back that
same copy and :func:`start` simply finds the agent already running.

    import mmap
    from uffdsrv import client

    # Private, not mmap's default MAP_SHARED: uffdsrv manages anonymous
    # private memory (MADV_DONTNEED does not drop shared anonymous pages).
    buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if client.start("/run/uffdsrv.sock"):
        client.register(buf)

Registration goes through a short-lived connection of its own; the server
identifies the process by SO_PEERCRED, so it has to be this process that
calls :func:`start` first.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import cffi

__all__ = ["library_path", "limit", "register", "start", "status", "unregister"]

_CDEF = """
int uffdsrv_agent_start(const char *socket_path, unsigned flags);
int uffdsrv_register(void *addr, size_t len);
int uffdsrv_unregister(void *addr, size_t len);
const char *uffdsrv_agent_status(void);
"""

UFFDSRV_AUTO_MAPS = 0x4

library_path = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "_bin", "libuffdsrv_agent.so"
)

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib: Any = None
_lock = threading.Lock()
_socket_path: str | None = None


def _load() -> Any:
    global _lib
    with _lock:
        if _lib is None:
            if not os.path.exists(library_path):
                raise OSError(
                    errno.ENOENT,
                    f"uffdsrv agent library not found: {library_path} (run: make -C native)",
                )
            _lib = _ffi.dlopen(library_path)
        return _lib


def start(socket_path: str | os.PathLike[str], auto_maps: bool = False) -> bool:
    """Start the agent against the server at ``socket_path``.

    Returns True when this process is managed (also when it already was),
    False when it is not; :func:`status` then says why. A process that
    fails to start keeps running unmanaged.
    """
    global _socket_path
    lib = _load()
    path = os.fsencode(socket_path)
    flags = UFFDSRV_AUTO_MAPS if auto_maps else 0
    ok = lib.uffdsrv_agent_start(path, flags) == 0
    if ok:
        _socket_path = os.fsdecode(path)
    return ok


def status() -> str:
    """``"managed"``, ``"not started"``, or why the last start failed."""
    lib = _load()
    return _ffi.string(lib.uffdsrv_agent_status()).decode("utf-8", "replace")


def _address(buf_or_addr: Any, length: int | None, name: str) -> tuple[Any, int, Any]:
    """(void * cdata, length, keepalive) for an int address or a buffer."""
    if isinstance(buf_or_addr, int):
        if length is None:
            raise TypeError(f"{name}: length is required with an integer address")
        return _ffi.cast("void *", buf_or_addr), int(length), None
    try:
        cbuf = _ffi.from_buffer(buf_or_addr, require_writable=True)
    except (TypeError, BufferError) as e:
        raise TypeError(f"{name}: need a writable buffer or an address: {e}") from None
    size = _ffi.sizeof(cbuf)
    if length is None:
        length = size
    elif not 0 <= length <= size:
        raise ValueError(f"{name}: length {length} outside the buffer ({size} bytes)")
    return _ffi.cast("void *", cbuf), int(length), cbuf


def _call(fn_name: str, buf_or_addr: Any, length: int | None) -> None:
    lib = _load()
    ptr, size, keep = _address(buf_or_addr, length, fn_name)
    try:
        rc = getattr(lib, fn_name)(ptr, size)
    finally:
        if keep is not None:
            # Let an mmap be closed again: drop the buffer export now.
            _ffi.release(keep)
    if rc != 0:
        err = -rc
        addr = int(_ffi.cast("uintptr_t", ptr))
        raise OSError(
            err, f"{fn_name}: {os.strerror(err)} (addr 0x{addr:x}, len {size})"
        )


def register(buf_or_addr: Any, length: int | None = None) -> None:
    """Ask the server to manage a buffer (``mmap.mmap`` or any writable
    buffer) or ``length`` bytes at an integer address. The range must be
    page aligned; ``mmap.mmap`` objects are. Raises OSError on failure."""
    _call("uffdsrv_register", buf_or_addr, length)


def unregister(buf_or_addr: Any, length: int | None = None) -> None:
    """Stop managing a range given as in :func:`register`."""
    _call("uffdsrv_unregister", buf_or_addr, length)


def limit(nbytes: int | None) -> None:
    """Ask the server to hold this process to ``nbytes`` of resident managed
    memory (None: no budget). The server reclaims the coldest pages, a
    batch at a time, whenever the process goes over. Raises OSError when
    the server refuses (its reason in the message) or cannot be reached."""
    from . import ctl

    if _socket_path is None:
        raise OSError(errno.ENOTCONN, "uffdsrv limit: the agent is not started")
    try:
        ctl.request(_socket_path, "limit", timeout=10, pid=os.getpid(), bytes=nbytes)
    except ctl.ControlError as e:
        raise OSError(e.errno or errno.EINVAL, f"uffdsrv limit: {e}") from None
