/* Syscalls on other processes: pidfds, vectored madvise, and reading their
 * memory. Glibc 2.36 wraps none of pidfd_getfd / process_madvise, so they
 * go through syscall(2). */
#define _GNU_SOURCE
#include "native.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/kcmp.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#define IOV_BATCH 1024 /* UIO_MAXIOV */

int ufs_pidfd_open(int pid, unsigned flags) {
    int fd = syscall(SYS_pidfd_open, pid, flags);
    return fd >= 0 ? fd : -errno;
}

int ufs_pidfd_getfd(int pidfd, int targetfd, unsigned flags) {
    int fd = syscall(SYS_pidfd_getfd, pidfd, targetfd, flags);
    return fd >= 0 ? fd : -errno;
}

/* One call per 1024 ranges; returns bytes advised or -errno when none. */
int64_t ufs_process_madvise(int pidfd, const uint64_t *start, const uint64_t *len, int n,
                            int advice) {
    struct iovec iov[IOV_BATCH];
    int64_t total = 0;
    for (int off = 0; off < n; off += IOV_BATCH) {
        int k = n - off < IOV_BATCH ? n - off : IOV_BATCH;
        int64_t want = 0;
        for (int i = 0; i < k; i++) {
            iov[i].iov_base = (void *)(uintptr_t)start[off + i];
            iov[i].iov_len = len[off + i];
            want += len[off + i];
        }
        long r = syscall(SYS_process_madvise, pidfd, iov, k, advice, 0);
        if (r < 0) return total ? total : -errno;
        total += r;
        if (r < want) break;
    }
    return total;
}

/* Reads n remote ranges of process pid, back to back, into local. A range
 * that is missing in a uffd-registered area faults through the uffd: the
 * caller must not be the thread that resolves those faults. */
int64_t ufs_vm_readv(int pid, void *local, const uint64_t *start, const uint64_t *len, int n) {
    struct iovec remote[IOV_BATCH];
    char *dst = local;
    int64_t total = 0;
    for (int off = 0; off < n; off += IOV_BATCH) {
        int k = n - off < IOV_BATCH ? n - off : IOV_BATCH;
        size_t want = 0;
        for (int i = 0; i < k; i++) {
            remote[i].iov_base = (void *)(uintptr_t)start[off + i];
            remote[i].iov_len = len[off + i];
            want += len[off + i];
        }
        struct iovec l = {dst, want};
        ssize_t r = process_vm_readv(pid, &l, 1, remote, k, 0);
        if (r < 0) return total ? total : -errno;
        total += r;
        dst += r;
        if ((size_t)r < want) break;
    }
    return total;
}

int ufs_zero_pages(const void *buf, int npages, uint8_t *is_zero) {
    int zeros = 0;
    for (int p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)((const char *)buf + (size_t)p * 4096);
        uint64_t acc = 0;
        for (int i = 0; i < 512; i += 8)
            acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] |
                   w[i + 7];
        is_zero[p] = acc == 0;
        zeros += acc == 0;
    }
    return zeros;
}

/* Sum of the "TLB" row of /proc/interrupts over all CPUs (x86), -errno if
 * the file cannot be read, -ENOENT if there is no such row. */
int64_t ufs_tlb_shootdowns(void) {
    FILE *f = fopen("/proc/interrupts", "re");
    if (!f) return -errno;
    char line[8192];
    int64_t total = -ENOENT;
    while (fgets(line, sizeof line, f)) {
        char *s = line;
        while (*s == ' ') s++;
        if (strncmp(s, "TLB:", 4)) continue;
        total = 0;
        for (char *p = s + 4, *end;; p = end) {
            long long v = strtoll(p, &end, 10);
            if (end == p) break;
            total += v;
        }
    }
    fclose(f);
    return total;
}

/* kcmp(KCMP_FILE) of two of our own fds: 0 if they are the same open file
 * (a uffd is one userfaultfd context however often it was dup'd or sent),
 * 1 or 2 for an order, -errno on failure. */
int ufs_kcmp_file(int fd1, int fd2) {
    pid_t self = getpid();
    long r = syscall(SYS_kcmp, self, self, KCMP_FILE, fd1, fd2);
    return r < 0 ? -errno : (int)r;
}
