/*
 * faulter: the program whose memory the benchmarks reclaim and fault back.
 *
 *   faulter --mib N [--stride S] [--seed X] [--busy B]
 *
 * Maps N MiB of anonymous memory (4 KiB pages: MADV_NOHUGEPAGE), writes a
 * pattern into every S-th page (S = 2 leaves a never-touched page between
 * two filled ones, so that no two reclaimed pages can be zapped as one
 * range), starts B busy threads (a program that keeps running while its
 * cold memory is reclaimed: they spin on a private variable, never on the
 * buffer, and make every zap of this mm a cross-CPU TLB flush), prints "ready <hex addr> <npages> <filled>", then answers one
 * line per command on stdin:
 *
 *   fill G              rewrite every filled page with generation G
 *   pageout             MADV_PAGEOUT on the whole buffer: the kernel swaps
 *                       it out (to whatever swap the harness enabled)
 *                       -> ok <seconds> <tlb> <cpu_s> <swapped> <swapcached>
 *   swapstat            where the buffer's pages are now
 *                       -> ok <swapped> <swapcached> <present>
 *   refreclaim PATH     the C reference: write the buffer to PATH (O_DIRECT
 *                       where the filesystem allows it), register it with a
 *                       userfaultfd of our own, zap it, and start
 *                       native/bench/refhandler on that uffd
 *                       -> ok <seconds> <handler_pid> <direct|buffered>
 *   fault seq|random T  touch every filled page once, T threads, and time
 *                       each access; checks the first word of each page
 *                       -> ok <wall_s> <pages> <faults> <p50_ns> <p99_ns>
 *                             <access_p50_ns> <access_p99_ns> <bad>
 *                             <sys_ns> <handler_cpu_ns>
 *                       sys_ns: our own system time during the walk (where
 *                       the kernel's swap-in is accounted); handler_cpu_ns:
 *                       the C reference handler's CPU time since it started
 *                       (it does nothing but serve these faults), 0 if none
 *   rss | exit
 *
 * What a "fault" is: an access to a page that /proc/self/pagemap showed
 * not present in our page table just before (bit 63 clear). That covers a
 * page zapped by a uffd handler and a page the kernel swapped out, also
 * one whose copy is still in the swap cache (its access is then a minor
 * fault, no read). Reading pagemap never faults a page in. The latency of
 * a faulting access is the whole round trip: the thread traps, the kernel
 * queues the fault on the uffd (or finds or reads the swap page), a handler
 * elsewhere wakes, reads and resolves it, and the thread is woken again.
 * Accesses that find the page already mapped (brought in by readahead) are
 * counted in the access percentiles only. The pagemap read is outside each
 * timed access but inside the wall time, so it costs every method alike.
 */
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif
#define MAX_THREADS 64

extern char **environ;

static char *base;
static size_t npages, stride = 1, nfilled;
static uint64_t seed = 1, generation = 1;
static char handler_path[4096];
static pid_t handler_pid = -1;
static int ref_uffd = -1;
static volatile uint64_t busy_word;

static void *busy(void *arg) {
    (void)arg;
    for (;;) (void)busy_word;
    return NULL;
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline uint64_t pattern(size_t i, uint64_t w) {
    return splitmix64(seed ^ ((uint64_t)i << 20) ^ (generation << 44) ^ w);
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void fill(void) {
    for (size_t i = 0; i < npages; i += stride) {
        uint64_t *p = (uint64_t *)(base + i * PAGE);
        for (uint64_t w = 0; w < PAGE / 8; w++) p[w] = pattern(i, w);
    }
}

static long rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

/* ---- kernel swap ---- */

/* pagemap bit 62: the PTE is a swap entry; bit 63: present. mincore then
 * says whether a swapped page is still in the swap cache (MADV_PAGEOUT
 * starts the write and unmaps; without memory pressure the written folio
 * stays cached, and its next access is a minor fault with no read). */
static void swap_state(size_t *swapped, size_t *cached, size_t *present) {
    size_t len = npages * PAGE;
    *swapped = *cached = *present = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    unsigned char *vec = malloc(npages);
    uint64_t *pm = malloc(npages * sizeof *pm);
    if (fd >= 0 && vec && pm && mincore(base, len, vec) == 0 &&
        pread(fd, pm, npages * sizeof *pm, (off_t)((uintptr_t)base / PAGE * 8)) ==
            (ssize_t)(npages * sizeof *pm)) {
        for (size_t i = 0; i < npages; i++) {
            if (pm[i] >> 62 & 1) {
                (*swapped)++;
                *cached += vec[i] & 1;
            }
            *present += pm[i] >> 63 & 1;
        }
    }
    if (fd >= 0) close(fd);
    free(vec);
    free(pm);
}

static void cmd_pageout(void) {
    size_t len = npages * PAGE;
    long t0 = bench_tlb_shootdowns();
    double c0 = bench_cpu_s(), s0 = bench_now();
    int r = madvise(base, len, MADV_PAGEOUT);
    double secs = bench_now() - s0, cpu = bench_cpu_s() - c0;
    long tlb = bench_tlb_shootdowns() - t0;
    if (r < 0) {
        reply("err pageout: %s", strerror(errno));
        return;
    }
    size_t swapped, cached, present;
    swap_state(&swapped, &cached, &present);
    reply("ok %.9f %ld %.9f %zu %zu", secs, tlb, cpu, swapped, cached);
}

static void cmd_swapstat(void) {
    size_t swapped, cached, present;
    swap_state(&swapped, &cached, &present);
    reply("ok %zu %zu %zu", swapped, cached, present);
}

/* ---- the C reference handler ---- */

static void ref_stop(void) {
    if (handler_pid > 0) {
        kill(handler_pid, SIGTERM);
        while (waitpid(handler_pid, NULL, 0) < 0 && errno == EINTR) {
        }
        handler_pid = -1;
    }
    if (ref_uffd >= 0) {
        /* Everything was faulted back: unregistering now loses nothing. */
        struct uffdio_range r = {(unsigned long)base, npages * PAGE};
        ioctl(ref_uffd, UFFDIO_UNREGISTER, &r);
        close(ref_uffd);
        ref_uffd = -1;
    }
}

static void cmd_refreclaim(const char *path) {
    if (handler_pid > 0) {
        reply("err refreclaim: a handler is already running");
        return;
    }
    double s0 = bench_now();
    size_t len = npages * PAGE;
    /* The swap file: page i at offset i * 4096, blocks allocated once
     * (fallocate, as for a kernel swap file: the first round does not pay
     * for block allocation, later ones overwrite in place), written with
     * O_DIRECT straight from the page-aligned buffer, so that no copy is
     * left in the page cache and the handler's reads go to the device.
     * Where the filesystem refuses O_DIRECT (tmpfs), write through the page
     * cache, sync, and drop the cached pages instead. */
    int direct = 1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0600);
    if (fd < 0 && errno == EINVAL) {
        direct = 0;
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        reply("err refreclaim: open %s: %s", path, strerror(errno));
        return;
    }
    int e = posix_fallocate(fd, 0, (off_t)len);
    if (e && e != EOPNOTSUPP) {
        reply("err refreclaim: fallocate: %s", strerror(e));
        close(fd);
        return;
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = pwrite(fd, base + off, len - off < (8u << 20) ? len - off : (8u << 20),
                           (off_t)off);
        if (w <= 0) {
            reply("err refreclaim: write: %s", w < 0 ? strerror(errno) : "short");
            close(fd);
            return;
        }
        off += (size_t)w;
    }
    if (fdatasync(fd) < 0 || (!direct && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED))) {
        reply("err refreclaim: sync: %s", strerror(errno));
        close(fd);
        return;
    }
    close(fd);
    /* Not O_CLOEXEC: the handler inherits it. A uffd acts on the mm of the
     * process that created it (ours), whoever holds the fd. No features:
     * the reference handles page faults and nothing else. */
    ref_uffd = (int)syscall(SYS_userfaultfd, O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ref_uffd < 0 || ioctl(ref_uffd, UFFDIO_API, &api) < 0) {
        reply("err refreclaim: userfaultfd: %s", strerror(errno));
        if (ref_uffd >= 0) close(ref_uffd);
        ref_uffd = -1;
        return;
    }
    struct uffdio_register reg = {.range = {(unsigned long)base, len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(ref_uffd, UFFDIO_REGISTER, &reg) < 0) {
        reply("err refreclaim: UFFDIO_REGISTER: %s", strerror(errno));
        close(ref_uffd);
        ref_uffd = -1;
        return;
    }
    /* Zap: the pages are now missing, and each access faults. */
    madvise(base, len, MADV_DONTNEED);
    char fdarg[16], basearg[32], lenarg[32];
    snprintf(fdarg, sizeof fdarg, "%d", ref_uffd);
    snprintf(basearg, sizeof basearg, "%#lx", (unsigned long)base);
    snprintf(lenarg, sizeof lenarg, "%zu", len);
    char *argv[] = {handler_path, "--uffd", fdarg, "--swap", (char *)path, "--base", basearg,
                    "--len", lenarg, "--direct", direct ? "1" : "0", NULL};
    /* posix_spawn (vfork underneath): no copy of our page tables. */
    e = posix_spawn(&handler_pid, handler_path, NULL, NULL, argv, environ);
    if (e) {
        handler_pid = -1;
        reply("err refreclaim: spawn %s: %s", handler_path, strerror(e));
        ref_stop();
        return;
    }
    reply("ok %.9f %d %s", bench_now() - s0, (int)handler_pid, direct ? "direct" : "buffered");
}

/* The handler's CPU time so far (ns): the first field of its schedstat,
 * exact, unlike the clock ticks of /proc/PID/stat. It is single-threaded
 * and has done nothing but sleep in poll() and serve our faults. */
static uint64_t handler_cpu_ns(void) {
    if (handler_pid <= 0) return 0;
    char p[64];
    unsigned long long ns = 0;
    snprintf(p, sizeof p, "/proc/%d/schedstat", (int)handler_pid);
    FILE *f = fopen(p, "r");
    if (f) {
        if (fscanf(f, "%llu", &ns) != 1) ns = 0;
        fclose(f);
    }
    return ns;
}

static uint64_t sys_ns(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_stime.tv_sec * 1000000000ull + (uint64_t)ru.ru_stime.tv_usec * 1000ull;
}

/* ---- fault-in ---- */

struct fjob {
    const uint32_t *order;
    size_t n;
    uint32_t *lat;   /* ns per access */
    uint8_t *fault;  /* 1: page was not mapped before the access */
    size_t bad;
    int pagemap;     /* /proc/self/pagemap, shared (pread is) */
};

static void *fworker(void *arg) {
    struct fjob *j = arg;
    for (size_t k = 0; k < j->n; k++) {
        size_t i = j->order[k];
        volatile uint64_t *p = (volatile uint64_t *)(base + i * PAGE);
        uint64_t pm = 0;
        j->fault[k] = pread(j->pagemap, &pm, sizeof pm, (off_t)((uintptr_t)p / PAGE * 8)) ==
                          (ssize_t)sizeof pm && !(pm >> 63 & 1);
        uint64_t t0 = bench_ns();
        uint64_t got = p[0];
        uint64_t dt = bench_ns() - t0;
        j->lat[k] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
        if (got != pattern(i, 0)) j->bad++;
    }
    return NULL;
}

static void cmd_fault(const char *args) {
    char pat[16] = "";
    int t = 1;
    if (sscanf(args, "%15s %d", pat, &t) != 2 || t < 1 || t > MAX_THREADS ||
        (strcmp(pat, "seq") && strcmp(pat, "random"))) {
        reply("err fault: need seq|random T");
        return;
    }
    size_t n = nfilled;
    uint32_t *order = malloc(n * sizeof *order);
    uint32_t *lat = malloc(n * sizeof *lat);
    uint8_t *flt = malloc(n);
    uint32_t *fl = malloc(n * sizeof *fl);
    if (!order || !lat || !flt || !fl) {
        reply("err fault: out of memory");
        free(order), free(lat), free(flt), free(fl);
        return;
    }
    for (size_t k = 0; k < n; k++) order[k] = (uint32_t)(k * stride);
    if (!strcmp(pat, "random")) {
        uint64_t x = seed * 2654435761u + 7;
        for (size_t k = n - 1; k > 0; k--) {
            x = splitmix64(x);
            size_t r = x % (k + 1);
            uint32_t tmp = order[k];
            order[k] = order[r];
            order[r] = tmp;
        }
    }
    /* Each thread takes one contiguous slice of the order: in "seq" each
     * walks its own ascending run of pages. */
    struct fjob jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    size_t per = (n + (size_t)t - 1) / (size_t)t;
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    for (int k = 0; k < t; k++) {
        size_t lo = (size_t)k * per < n ? (size_t)k * per : n;
        size_t hi = lo + per < n ? lo + per : n;
        jobs[k] = (struct fjob){order + lo, hi - lo, lat + lo, flt + lo, 0, pagemap};
    }
    uint64_t sys0 = sys_ns();
    double s0 = bench_now();
    for (int k = 1; k < t; k++) pthread_create(&tids[k], NULL, fworker, &jobs[k]);
    fworker(&jobs[0]);
    for (int k = 1; k < t; k++) pthread_join(tids[k], NULL);
    double wall = bench_now() - s0;
    uint64_t sys = sys_ns() - sys0, hcpu = handler_cpu_ns();
    if (pagemap >= 0) close(pagemap);
    ref_stop();
    size_t bad = 0, nf = 0;
    for (int k = 0; k < t; k++) bad += jobs[k].bad;
    for (size_t k = 0; k < n; k++)
        if (flt[k]) fl[nf++] = lat[k];
    qsort(fl, nf, sizeof *fl, bench_cmp_u32);
    qsort(lat, n, sizeof *lat, bench_cmp_u32);
    reply("ok %.9f %zu %zu %u %u %u %u %zu %llu %llu", wall, n, nf, bench_quantile(fl, nf, 0.5),
          bench_quantile(fl, nf, 0.99), bench_quantile(lat, n, 0.5),
          bench_quantile(lat, n, 0.99), bad, (unsigned long long)sys, (unsigned long long)hcpu);
    free(order), free(lat), free(flt), free(fl);
}

static void usage(void) {
    fprintf(stderr, "usage: faulter --mib N [--stride S] [--seed X] [--busy B]\n"
                    "commands: fill G | pageout | swapstat | refreclaim PATH | fault seq|random T |"
                    " rss | exit\n");
}

int main(int argc, char **argv) {
    size_t mib = 64;
    int nbusy = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--mib"))
            mib = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && !strcmp(argv[i], "--stride"))
            stride = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && !strcmp(argv[i], "--seed"))
            seed = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && !strcmp(argv[i], "--busy"))
            nbusy = atoi(argv[++i]);
        else {
            usage();
            return 2;
        }
    }
    if (mib < 1) mib = 1;
    if (stride < 1) stride = 1;
    npages = mib * 1024 * 1024 / PAGE;
    nfilled = (npages + stride - 1) / stride;
    /* refhandler lives beside us */
    ssize_t n = readlink("/proc/self/exe", handler_path, sizeof handler_path - 32);
    if (n > 0) {
        handler_path[n] = 0;
        char *slash = strrchr(handler_path, '/');
        strcpy(slash ? slash + 1 : handler_path, "refhandler");
    }
    base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        perror("faulter: mmap");
        return 1;
    }
    madvise(base, npages * PAGE, MADV_NOHUGEPAGE);
    fill();
    for (int b = 0; b < nbusy && b < MAX_THREADS; b++) {
        pthread_t t;
        /* named, so that the harness leaves them out of CPU accounting */
        if (pthread_create(&t, NULL, busy, NULL) == 0) pthread_setname_np(t, "faulter-busy");
    }
    reply("ready %p %zu %zu", (void *)base, npages, nfilled);

    char line[4352];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        char cmd[32] = "";
        int off = 0;
        if (sscanf(line, "%31s%n", cmd, &off) != 1) continue;
        const char *args = line + off;
        while (*args == ' ') args++;
        unsigned long long g;
        if (!strcmp(cmd, "fill")) {
            if (sscanf(args, "%llu", &g) != 1) {
                reply("err fill: need a generation");
                continue;
            }
            generation = g;
            fill();
            reply("ok");
        } else if (!strcmp(cmd, "pageout")) {
            cmd_pageout();
        } else if (!strcmp(cmd, "swapstat")) {
            cmd_swapstat();
        } else if (!strcmp(cmd, "refreclaim")) {
            cmd_refreclaim(args);
        } else if (!strcmp(cmd, "fault")) {
            cmd_fault(args);
        } else if (!strcmp(cmd, "rss")) {
            reply("ok %ld", rss_kb());
        } else if (!strcmp(cmd, "exit")) {
            ref_stop();
            reply("bye");
            return 0;
        } else {
            reply("err unknown command: %.40s", cmd);
        }
    }
    ref_stop();
    return 0;
}
