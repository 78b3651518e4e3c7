"""Which uffd a peer may hand us.

A uffd works on the memory of the process that created it, whoever holds
it: a uffd of another process would let a peer have the server serve (and
reclaim) someone else's memory. So the one sent with HELLO must have been
through UFFDIO_API with the required features (what the kernel says in
fdinfo, not what HELLO claims), must not be another client's context
(kcmp: two readers of one context steal each other's faults), and must
act on the peer's own memory: registering the peer's beacon page through
it must show in the peer's /proc/PID/smaps.

Who the peer is: SO_PEERCRED names the process that connected. The
agent's first HELLO comes from the program itself; the later ones (a
reconnect, a forked child's) come from its zap helper, a CLONE_VM child
with its own pid, and say so with HELLO_HELPER. Such a HELLO speaks for
the helper's parent, and only if the two share one mm (kcmp KCMP_VM): a
process that merely claims the flag speaks for nobody else.

Fork events are the one required feature a uffd may lack: the kernel gives
UFFD_FEATURE_EVENT_FORK only to a caller with CAP_SYS_PTRACE, and a program
that does not run as root has its pages brought back before each fork
instead (forks.py).
"""
import errno
import logging

from ..core import protocol
from ..core.pages import PAGE
from ..system import ident, procfs, uffd
from .managed import Registry

log = logging.getLogger("uffdsrv")
NEEDED = uffd.REQUIRED_FEATURES & ~uffd.FEATURE_EVENT_FORK


class Refused(OSError):
    """A well-formed request the server will not honour: ERROR, then drop."""


def hello_pid(peer_pid: int, hello: dict) -> int:
    """The pid a HELLO speaks for: the peer's, or for a zap helper's, the
    program it serves (its parent, sharing its mm)."""
    if not hello["flags"] & protocol.HELLO_HELPER:
        return peer_pid
    parent = procfs.ppid(peer_pid) if peer_pid > 0 else None
    if not parent or parent <= 1 or not procfs.same_vm(peer_pid, parent):
        raise Refused(errno.EPERM, f"pid {peer_pid} says HELLO as a zap helper but shares "
                                   f"no mm with its parent {parent}")
    return parent


def check_uffd(fd: int, pid: int, hello: dict, clients: Registry) -> bool:
    """Refuse a uffd that is not this peer's to give; True if it is the
    context this pid's client already holds."""
    for c in clients.all():
        if c.closed or c.uffd is None:
            continue
        if ident.same_file(fd, c.uffd):
            if c.pid == pid:
                return True
            raise Refused(errno.EBUSY, "this userfaultfd is another client's")
    features = ident.uffd_features(fd)
    if features is None:
        raise Refused(errno.EINVAL, "the userfaultfd has not been through UFFDIO_API")
    if features & NEEDED != NEEDED:
        raise Refused(errno.EOPNOTSUPP,
                      f"the userfaultfd lacks required features (has {features:#x})")
    if not hello["beacon"]:
        raise Refused(errno.EINVAL, "HELLO without a beacon page")
    check_owner(fd, pid, hello["beacon"])
    if not features & uffd.FEATURE_EVENT_FORK:
        log.info("pid %s has no fork events (CAP_SYS_PTRACE): pages come back before each fork",
                 pid)
    return False


def check_owner(fd: int, pid: int, beacon: int) -> None:
    """Does the uffd act on pid's memory? Registering the beacon page through
    it must show as "um" in pid's smaps; if the page is registered already
    (an agent back with its uffd, or a decoy registration by the peer's own
    uffd), unregistering through it must clear the mark first. A uffd of
    another process changes nothing in pid's smaps."""
    foreign = Refused(errno.EPERM, f"the userfaultfd does not act on the memory of pid {pid}")
    try:
        flags = ident.vmflags_at(pid, beacon)
        if flags is None:
            raise Refused(errno.EINVAL, f"beacon {beacon:#x} is not mapped in pid {pid}")
        if "um" in flags:
            uffd.unregister(fd, beacon, PAGE)
            if "um" in (ident.vmflags_at(pid, beacon) or ()):
                raise foreign
        uffd.register(fd, beacon, PAGE, uffd.REGISTER_MODE_MISSING)
    except Refused:
        raise
    except OSError as e:
        raise Refused(errno.EPERM, f"the userfaultfd cannot register beacon {beacon:#x} of "
                                   f"pid {pid}: {e.strerror or e}") from None
    try:
        mine = "um" in (ident.vmflags_at(pid, beacon) or ())
    except OSError:
        mine = False
    if not mine:
        try:
            uffd.unregister(fd, beacon, PAGE)
        except OSError:
            pass
        raise foreign
