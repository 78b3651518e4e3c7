"""-errno to OSError, in the manner of psutil: the exception class comes from
errno (ESRCH is ProcessLookupError), the message names the call and, where
there is one, the pid."""
import os


def raise_errno(err: int, call: str, pid: int | None = None):
    what = call if pid is None else f"{call} (pid {pid})"
    raise OSError(err, f"{what}: {os.strerror(err)}")


def check(ret: int, call: str, pid: int | None = None) -> int:
    if ret < 0:
        raise_errno(-ret, call, pid)
    return ret
