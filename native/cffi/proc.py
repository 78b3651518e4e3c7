"""cdef for syscalls on other processes: pidfds, process_madvise,
process_vm_readv, and the TLB shootdown counter of /proc/interrupts."""

INCLUDES = """
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
/* Newer than Debian 12's 6.1 headers. PIDFD_SELF is PIDFD_SELF_THREAD of
 * linux/pidfd.h; PAGEMAP_SCAN is _IOWR('f', 16, struct pm_scan_arg), the
 * struct being 96 bytes (linux/fs.h, which glibc's sys/mount.h fights). */
#ifndef PIDFD_SELF
#define PIDFD_SELF (-10000)
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN 0xC0606610u
#endif
"""

CDEF = """
#define MADV_DONTNEED ...
#define MADV_COLD ...
#define MADV_PAGEOUT ...
#define MADV_COLLAPSE ...
#define PIDFD_SELF ...
#define PAGEMAP_SCAN ...
"""
