/*
 * Shared by the benchmark programs in native/bench: clocks, the TLB
 * shootdown counter, and the kernel constants that Debian 12's 6.1 headers
 * lack. Header-only on purpose: each program is one translation unit.
 */
#ifndef UFFDSRV_BENCH_H
#define UFFDSRV_BENCH_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21 /* Linux 5.4 */
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440 /* x86-64, Linux 5.10 */
#endif
/* The pseudo-pidfd for "this process" (uapi/linux/pidfd.h, Linux 6.15+);
 * process_madvise(MADV_DONTNEED) accepts only our own mm (Linux 6.13+). */
#ifndef PIDFD_SELF
#define PIDFD_SELF (-10000)
#endif
/* UIO_MAXIOV: the most ranges one process_madvise call takes. */
#define BENCH_MAX_VLEN 1024

static inline double bench_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline uint64_t bench_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static inline long bench_process_madvise(int pidfd, const struct iovec *iov, size_t n,
                                         int advice) {
    return syscall(SYS_process_madvise, pidfd, iov, n, advice, 0);
}

/* Sum over CPUs of the "TLB shootdowns" row of /proc/interrupts (x86).
 * Every CPU that had to flush because another one changed a page table it
 * might cache counts one. -1 where the row does not exist. */
static inline long bench_tlb_shootdowns(void) {
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f) return -1;
    char line[8192];
    long total = -1;
    while (fgets(line, sizeof line, f)) {
        char *s = line;
        while (*s == ' ') s++;
        if (strncmp(s, "TLB:", 4) != 0) continue;
        total = 0;
        for (char *p = s + 4, *end;; p = end) {
            long v = strtol(p, &end, 10);
            if (end == p) break;
            total += v;
        }
        break;
    }
    fclose(f);
    return total;
}

/* CPU seconds (user + system) this process has used so far. */
static inline double bench_cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline int bench_cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* The q-quantile (0..1) of n sorted values, nearest rank. */
static inline uint32_t bench_quantile(const uint32_t *sorted, size_t n, double q) {
    if (n == 0) return 0;
    size_t i = (size_t)(q * (double)n);
    return sorted[i < n ? i : n - 1];
}

#endif
