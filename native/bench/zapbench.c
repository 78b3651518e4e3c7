/*
 * zapbench: what one zap costs, madvise against vectored process_madvise.
 *
 *   zapbench --memory anon|uffd|uffd+remove --busy B --ranges N --rounds R
 *            [--vlen V,V,...]
 *
 * Prints one JSON object per method and vlen on stdout:
 *   {"method": "madvise"|"process_madvise", "vlen": V, "busy": B, "memory": M,
 *    "ranges": N*R, "calls": C, "seconds": S, "tlb": T}
 *
 * Why it is built this way
 * ------------------------
 *  - N single-page ranges, one page apart, so that no two ranges merge
 *    into one: each range is one VMA walk and (for madvise) one flush.
 *  - MADV_DONTNEED on a present page must flush every CPU that may cache
 *    the translation: those running a thread of this mm. madvise flushes
 *    once per call, so once per range; process_madvise (Linux >= 6.16)
 *    gathers the whole vector and flushes once per call. The busy threads
 *    (pinned to CPUs 1..B, reading a page that is never zapped) are what
 *    makes a flush an IPI, a "TLB shootdown" in /proc/interrupts. With no
 *    busy thread only lazily-switched CPUs get one, if any.
 *  - The zapping thread is pinned to CPU 0 so that it never shares a CPU
 *    with a busy thread.
 *  - Between rounds every page is put back (a write on plain memory,
 *    UFFDIO_COPY on registered memory: a write there would fault through
 *    the uffd). Only the zap itself is timed, and the shootdown counter is
 *    read just around it.
 *  - uffd+remove: with UFFD_FEATURE_EVENT_REMOVE every zapped range raises
 *    a REMOVE event and the zapping thread waits until a reader has read
 *    it; a reader thread drains them as a monitor would.
 */
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif

#define MAX_BUSY 64

static atomic_int stop_busy, busy_running;
static volatile char *busy_target;
static int ncpus;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu % ncpus, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void *busy(void *arg) {
    pin((int)(intptr_t)arg);
    atomic_fetch_add(&busy_running, 1);
    while (!atomic_load_explicit(&stop_busy, memory_order_relaxed)) (void)busy_target[0];
    return NULL;
}

static int reader_fd = -1;
static atomic_int stop_reader;
static void *reader(void *arg) {
    (void)arg;
    struct uffd_msg msgs[64];
    while (!atomic_load(&stop_reader)) {
        struct pollfd p = {reader_fd, POLLIN, 0};
        if (poll(&p, 1, 10) > 0) (void)!read(reader_fd, msgs, sizeof msgs);
    }
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void usage(void) {
    fprintf(stderr, "usage: zapbench --memory anon|uffd|uffd+remove --busy B --ranges N "
                    "--rounds R [--vlen V,V,...]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *memory = "anon";
    int nbusy = 0, nranges = 1024, rounds = 20;
    int vlens[16], nvlen = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--memory"))
            memory = argv[++i];
        else if (!strcmp(argv[i], "--busy"))
            nbusy = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ranges"))
            nranges = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rounds"))
            rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--vlen")) {
            for (char *s = strtok(argv[++i], ","); s && nvlen < 16; s = strtok(NULL, ","))
                vlens[nvlen++] = atoi(s);
        } else
            usage();
    }
    int uffd_mode = !strcmp(memory, "uffd") ? 1 : !strcmp(memory, "uffd+remove") ? 2 : 0;
    if (!uffd_mode && strcmp(memory, "anon")) usage();
    if (nvlen == 0) {
        int d[] = {1, 8, 64, 256, 1024};
        for (nvlen = 0; nvlen < 5; nvlen++) vlens[nvlen] = d[nvlen];
    }
    if (nranges < 1 || rounds < 1 || nbusy < 0 || nbusy > MAX_BUSY) usage();
    ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);

    /* Two pages per range: the range, and a gap that keeps ranges apart.
     * One more page at the end for the busy threads to read. */
    size_t len = (2 * (size_t)nranges + 1) * PAGE;
    char *area = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        perror("zapbench: mmap");
        return 1;
    }
    /* 4 KiB pages only: a huge page would be split by the first zap. */
    madvise(area, len, MADV_NOHUGEPAGE);
    memset(area, 1, len);
    busy_target = area + len - PAGE;

    int uffd = -1;
    pthread_t rd;
    if (uffd_mode) {
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = {.api = UFFD_API,
                                 .features = uffd_mode == 2 ? UFFD_FEATURE_EVENT_REMOVE : 0};
        if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0) {
            perror("zapbench: userfaultfd");
            return 1;
        }
        /* Register the zapped part only; present pages stay present. */
        struct uffdio_register reg = {
            .range = {(unsigned long)area, 2 * (size_t)nranges * PAGE},
            .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
            perror("zapbench: UFFDIO_REGISTER");
            return 1;
        }
        reader_fd = uffd;
        pthread_create(&rd, NULL, reader, NULL);
    }

    pin(0);
    pthread_t busy_tids[MAX_BUSY];
    for (int b = 0; b < nbusy; b++)
        pthread_create(&busy_tids[b], NULL, busy, (void *)(intptr_t)(b + 1));
    /* Measure only once every busy thread runs on its own CPU. */
    while (atomic_load(&busy_running) < nbusy) sched_yield();

    struct iovec *iov = calloc((size_t)nranges, sizeof *iov);
    static char src[PAGE] __attribute__((aligned(4096)));
    memset(src, 2, sizeof src);
    for (int i = 0; i < nranges; i++) {
        iov[i].iov_base = area + 2 * (size_t)i * PAGE;
        iov[i].iov_len = PAGE;
    }

    int rc = 0;
    /* Method 0 is madvise, method m > 0 process_madvise at vlens[m - 1].
     * Rounds interleave the methods, so that whatever else the machine
     * does meanwhile (on a VM: the host preempting a vCPU, which turns a
     * flush IPI into a deferred flush and no shootdown) falls on all of
     * them alike. Round -1 warms up and is not counted. */
    int nm = nvlen + 1;
    double spent[17] = {0};
    long tlb[17] = {0}, calls[17] = {0};
    /* per-round times too: their median resists a host that stalls us */
    double *per_round = calloc((size_t)nm * (size_t)rounds, sizeof *per_round);
    for (int r = -1; r < rounds && rc == 0; r++) {
        for (int m = 0; m < nm && rc == 0; m++) {
            int vlen = m == 0 ? 1 : vlens[m - 1];
            if (vlen < 1 || vlen > BENCH_MAX_VLEN) continue;
            for (int i = 0; i < nranges; i++) {
                if (uffd >= 0) {
                    struct uffdio_copy c = {.dst = (unsigned long)iov[i].iov_base,
                                            .src = (unsigned long)src, .len = PAGE};
                    /* EAGAIN: a REMOVE is still unread; it clears when the
                     * reader has read it and we run again */
                    while (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno == EAGAIN) sched_yield();
                } else {
                    *(volatile char *)iov[i].iov_base = 1;
                }
            }
            long ncalls = 0;
            long t0 = bench_tlb_shootdowns();
            double s = bench_now();
            if (m == 0) {
                for (int i = 0; i < nranges; i++, ncalls++)
                    if (madvise(iov[i].iov_base, PAGE, MADV_DONTNEED) < 0) {
                        perror("zapbench: madvise");
                        rc = 1;
                        break;
                    }
            } else {
                for (int off = 0; off < nranges; off += vlen, ncalls++) {
                    size_t n = (size_t)(nranges - off < vlen ? nranges - off : vlen);
                    long got = bench_process_madvise(PIDFD_SELF, iov + off, n, MADV_DONTNEED);
                    if (got != (long)(n * PAGE)) {
                        perror("zapbench: process_madvise(PIDFD_SELF, MADV_DONTNEED)");
                        rc = 1;
                        break;
                    }
                }
            }
            double dt = bench_now() - s;
            long dtlb = bench_tlb_shootdowns() - t0;
            if (r >= 0) {
                spent[m] += dt;
                per_round[m * rounds + r] = dt;
                tlb[m] += dtlb;
                calls[m] += ncalls;
            }
        }
    }
    for (int m = 0; m < nm && rc == 0; m++) {
        int vlen = m == 0 ? 1 : vlens[m - 1];
        if (vlen < 1 || vlen > BENCH_MAX_VLEN) continue;
        double *pr = per_round + m * rounds;
        qsort(pr, (size_t)rounds, sizeof *pr, cmp_double);
        printf("{\"method\": \"%s\", \"vlen\": %d, \"busy\": %d, \"memory\": \"%s\", "
               "\"ranges\": %ld, \"calls\": %ld, \"seconds\": %.9f, "
               "\"median_round_seconds\": %.9f, \"ranges_per_round\": %d, \"tlb\": %ld}\n",
               m == 0 ? "madvise" : "process_madvise", vlen, nbusy, memory,
               (long)nranges * rounds, calls[m], spent[m], pr[rounds / 2], nranges, tlb[m]);
    }
    fflush(stdout);

    atomic_store(&stop_busy, 1);
    for (int b = 0; b < nbusy; b++) pthread_join(busy_tids[b], NULL);
    if (uffd >= 0) {
        atomic_store(&stop_reader, 1);
        pthread_join(rd, NULL);
        close(uffd);
    }
    free(iov);
    free(per_round);
    return rc;
}
