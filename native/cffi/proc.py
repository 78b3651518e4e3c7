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

int ufs_pidfd_open(int pid, unsigned flags);
int ufs_pidfd_getfd(int pidfd, int targetfd, unsigned flags);
int64_t ufs_process_madvise(int pidfd, const uint64_t *start, const uint64_t *len, int n,
                            int advice);
int64_t ufs_madvise_each(const uint64_t *start, const uint64_t *len, int n, int advice);
int64_t ufs_vm_readv(int pid, void *local, const uint64_t *start, const uint64_t *len, int n);
int ufs_zero_pages(const void *buf, int npages, uint8_t *is_zero);
int64_t ufs_tlb_shootdowns(void);
"""
