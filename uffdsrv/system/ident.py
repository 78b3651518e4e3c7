"""Identity of files and peers, as the kernel tells it.

* kcmp(KCMP_FILE) says whether two fds of ours are the same open file: a
  uffd sent twice (dup'd, or inherited across fork by a child that then
  sends its parent's uffd) is one userfaultfd context. Two readers of one
  context would steal each other's faults, so a context is one client's.
* /proc/self/fdinfo/FD of a uffd shows the features the kernel granted.
* /proc/PID/smaps shows "um" in VmFlags of a VMA registered MISSING, in
  the mm of the uffd that registered it: that is how the server learns
  that a uffd sent by pid P acts on P's memory and not another process's
  (a uffd works on the mm that created it, whoever holds it).
* /proc/PID/status "Groups:" gives a peer's supplementary groups
  (SO_PEERCRED has only the primary one).
"""
from .._native import lib
from ..core import access
from .errors import check


def same_file(fd1: int, fd2: int) -> bool:
    return check(lib.ufs_kcmp_file(fd1, fd2), "kcmp") == 0


def uffd_features(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return access.fdinfo_features(f.read())
    except OSError:
        return None


def vmflags_at(pid: int, addr: int) -> set[str] | None:
    with open(f"/proc/{pid}/smaps") as f:
        return access.vmflags_at(f.read(), addr)


def groups(pid: int, gid: int) -> set[int]:
    out = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    out.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return out
