"""What the server takes of the machine: open files, and the largest
mapping it manages."""
import logging
import os
import resource

log = logging.getLogger("uffdsrv")


def raise_nofile() -> None:
    """Every managed process costs the server fds (its uffd, pidfd and agent
    socket, and a forked child's uffd that the kernel installs while the
    parent's fork() waits): the default soft limit of 1024 runs out with a
    few hundred clients. Take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)


def default_max_region() -> int:
    """Twice the machine's memory: a mapping larger than that can never be
    mostly memory; it is reserved address space (sanitizer shadows,
    allocator arenas) whose per-page state alone would cost gigabytes."""
    return 2 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
