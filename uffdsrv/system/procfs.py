"""/proc as text: what the kernel tells about processes and the machine.

Every reader here is a plain read of a /proc file, with no native code, so
the CLI, the live view, the benchmark and the unit tests can use them on a
machine where nothing is built.

* /proc/PID/stat field 22 (starttime, in clock ticks since boot) tells a
  reused pid apart from the process the journal names.
* /proc/PID/status "Tgid:" names the process of a thread id; the id must be
  in *our* pid namespace (a fault's THREAD_ID is in the faulting thread's).
* /proc/PID/fd/N of a userfaultfd reads "anon_inode:[userfaultfd]".
* The agent's zapper is a helper process: a CLONE_VM child of the program
  (its mm, not its thread group or fd table), named "uffdsrv-zap", which
  holds the agent's uffd in a table of its own. A program's children are
  listed per thread in /proc/PID/task/TID/children; kcmp(KCMP_VM) says
  whether one shares the program's mm (the one call here that is not a
  read of /proc: libc's syscall(), so nothing native is needed).
* /proc/meminfo is the machine's memory: what a user sees in `free`.
  Memory given back is MemFree (and the page cache that did not grow),
  never a process's RSS: a page written to a file through the page cache
  only moves from the program into the kernel's cache.
"""
import ctypes
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


_SYS_KCMP = 312  # x86-64
_KCMP_VM = 1
_libc = None


def same_vm(pid1: int, pid2: int) -> bool:
    """kcmp(KCMP_VM): do the two processes share one mm? False when it
    cannot be told (no such pid, no permission, no kcmp)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall(ctypes.c_long(_SYS_KCMP), ctypes.c_long(pid1), ctypes.c_long(pid2),
                         ctypes.c_long(_KCMP_VM), ctypes.c_long(0), ctypes.c_long(0)) == 0


def helpers(pid: int) -> list[int]:
    """The children of pid that share its mm: the agent's zap helper."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text is None:  # no CONFIG_PROC_CHILDREN: scan /proc
            kids = children(pid)
            break
        kids.extend(int(k) for k in text.split())
    return [k for k in sorted(set(kids)) if same_vm(pid, k)]


def agent_uffd(pid: int) -> tuple[int, int] | None:
    """(holder pid, fd number) of the agent's uffd for the program pid: in
    its zap helper's fd table, or (an older agent) in its own."""
    for h in helpers(pid):
        found = uffd_fds(h)
        if found:
            return h, found[0]
    num = find_uffd(pid)
    return None if num is None else (pid, num)


def find_uffd(pid: int) -> int | None:
    """The fd number of the agent's uffd in the process's own fd table: an
    older agent kept it at 900 or above; a program's own uffds sit lower.
    Today's agent keeps it in its helper's table (agent_uffd)."""
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


# --- pid namespaces --------------------------------------------------------
# A fork's child is in its parent's pid_for_children namespace, and its
# fault's THREAD_ID is its tid *there* (pid 1 for `unshare -pf`'s child).
# Our /proc shows every process of our namespace and below; "NSpid:" in
# its status lists its pids from our namespace down to its own, so the
# last field is the number its own threads see. This kernel has no
# /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN): a process's
# children are found by their "PPid:".

def _status_field(pid: int, name: str) -> list[int] | None:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(name):
            try:
                return [int(x) for x in line.split()[1:]]
            except ValueError:
                return None
    return None


def nspid(pid: int) -> list[int] | None:
    """The process's pids, from our pid namespace down to its own."""
    return _status_field(pid, "NSpid:")


def ppid(pid: int) -> int | None:
    got = _status_field(pid, "PPid:")
    return got[0] if got else None


def pid_ns(pid: int | str, for_children: bool = False) -> int | None:
    """The inode of the process's pid namespace (or of the one its next
    children get): equal inodes, the same namespace."""
    try:
        return os.stat(f"/proc/{pid}/ns/{'pid_for_children' if for_children else 'pid'}").st_ino
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The pids (in our namespace) of the process's children, by a scan of
    /proc: a few ms with a few hundred processes."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(name))
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
