"""/proc as text: what the kernel tells about processes and the machine.

Every reader here is a plain read of a /proc file, with no native code, so
the CLI, the live view, the benchmark and the unit tests can use them on a
machine where nothing is built.

* /proc/PID/stat field 22 (starttime, in clock ticks since boot) tells a
  reused pid apart from the process the journal names.
* /proc/PID/status "Tgid:" names the process of a thread id; the id must be
  in *our* pid namespace (a fault's THREAD_ID is in the faulting thread's).
* /proc/PID/fd/N of a userfaultfd reads "anon_inode:[userfaultfd]".
* /proc/meminfo is the machine's memory: what a user sees in `free`.
  Memory given back is MemFree (and the page cache that did not grow),
  never a process's RSS: a page written to a file through the page cache
  only moves from the program into the kernel's cache.
"""
import os

UFFD_LINK = "anon_inode:[userfaultfd]"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def comm(pid: int) -> str:
    """The process's name ("?" when it is gone)."""
    text = _read(f"/proc/{pid}/comm")
    return text.strip() if text is not None else "?"


def cgroup(pid: int) -> str:
    """The process's cgroup v2 path ("" when unknown)."""
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


def starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def tgid_of(tid: int) -> int | None:
    for line in (_read(f"/proc/{tid}/status") or "").splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


def is_uffd(fd: int, pid: int | str = "self") -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == UFFD_LINK
    except OSError:
        return False


def uffd_fds(pid: int) -> list[int] | None:
    """The fd numbers of every userfaultfd the process holds, sorted; None
    when its fd table cannot be read."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    return sorted(int(n) for n in names if is_uffd(int(n), pid))


def find_uffd(pid: int) -> int | None:
    """The fd number of the agent's uffd in the process: the agent keeps it
    at 900 or above; a program's own uffds sit lower."""
    found = uffd_fds(pid)
    if not found:
        return None
    high = [fd for fd in found if fd >= 900]
    return high[0] if high else (found[0] if len(found) == 1 else None)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes: {"MemFree": ..., "Cached": ..., ...}."""
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def locked_smaps(pid: int) -> str | None:
    """/proc/PID/smaps (whose VmFlags say which mappings are mlocked), or
    "" when the process locks nothing: VmLck in its status is the cheap
    look, smaps walks every page table of the process. None when neither
    can be read."""
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmLck:"):
            if int(line.split()[1]) == 0:
                return ""
            return _read(f"/proc/{pid}/smaps")
    return None
