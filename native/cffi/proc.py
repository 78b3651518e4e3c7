"""cdef for syscalls on other processes: pidfds, process_madvise,
process_vm_readv, and the TLB shootdown counter of /proc/interrupts."""

INCLUDES = """
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
"""

CDEF = """
#define MADV_DONTNEED ...
#define MADV_COLD ...
#define MADV_PAGEOUT ...
#define MADV_COLLAPSE ...
"""
