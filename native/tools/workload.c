/*
 * workload: a multi-threaded test program for uffdsrv.
 *
 *   workload [--threads T] [--mib N] [--seed S]
 *
 * Maps N MiB of anonymous memory, prints "ready <hex addr> <npages>", then
 * answers one line per command read from stdin (see usage() below). Every
 * page's content is a pure function of (page index, generation, seed), so
 * a test can reclaim, fault back, fork, remap and unmap underneath it and
 * then ask whether every byte is still what the program last wrote.
 *
 * The expected state of each page lives in a malloc'd side array; under
 * LD_PRELOAD with auto-maps that array may be managed too, which is fine:
 * it is then checked implicitly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define ST_ZERO 0u          /* expected all zeros */
#define ST_GONE UINT32_MAX  /* unmapped: skipped */
#define MAX_RELOC 256

struct reloc {
    size_t a, b; /* pages [a, b) */
    char *addr;  /* their new place */
};

static char *base;
static size_t npages;
static int nthreads = 4;
static uint64_t seed = 1;
static uint32_t *state; /* per page: ST_ZERO, ST_GONE, or generation + 1 */
static struct reloc relocs[MAX_RELOC];
static int nrelocs;

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline uint64_t pattern(size_t i, uint64_t gen, uint64_t w) {
    return splitmix64(seed ^ ((uint64_t)i << 20) ^ (gen << 40) ^ w);
}

static char *page_addr(size_t i) {
    for (int r = 0; r < nrelocs; r++)
        if (i >= relocs[r].a && i < relocs[r].b) return relocs[r].addr + (i - relocs[r].a) * PAGE;
    return base + i * PAGE;
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

/* ---- parallel page loops ---- */

enum op { OP_FILL, OP_VERIFY, OP_WRITE, OP_TOUCH };

struct job {
    enum op op;
    uint64_t gen;
    size_t k;
    size_t lo, hi;
    size_t checked, bad;
    uint64_t sink;
};

static atomic_int reported;

static void fill_page(size_t i, uint64_t gen) {
    uint64_t *p = (uint64_t *)page_addr(i);
    for (uint64_t w = 0; w < WORDS; w++) p[w] = pattern(i, gen, w);
    state[i] = (uint32_t)gen + 1;
}

static void verify_page(struct job *j, size_t i) {
    uint32_t st = state[i];
    if (st == ST_GONE) return;
    const uint64_t *p = (const uint64_t *)page_addr(i);
    j->checked++;
    for (uint64_t w = 0; w < WORDS; w++) {
        uint64_t want = st == ST_ZERO ? 0 : pattern(i, st - 1, w);
        if (p[w] != want) {
            j->bad++;
            if (atomic_fetch_add(&reported, 1) < 5)
                fprintf(stderr,
                        "workload: bad page %zu at %p: word %" PRIu64 " is 0x%016" PRIx64
                        ", want 0x%016" PRIx64 " (%s)\n",
                        i, (const void *)p, w, p[w], want, st == ST_ZERO ? "zero" : "pattern");
            return;
        }
    }
}

static void *worker(void *arg) {
    struct job *j = arg;
    for (size_t i = j->lo; i < j->hi; i++) {
        switch (j->op) {
        case OP_FILL:
            if (state[i] != ST_GONE) fill_page(i, j->gen);
            break;
        case OP_WRITE:
            if (state[i] != ST_GONE && i % j->k == 0) fill_page(i, j->gen);
            break;
        case OP_VERIFY:
            verify_page(j, i);
            break;
        case OP_TOUCH:
            if (state[i] != ST_GONE) j->sink += *(volatile unsigned char *)page_addr(i);
            break;
        }
    }
    return NULL;
}

static void run(enum op op, uint64_t gen, size_t k, size_t *checked, size_t *bad) {
    int t = nthreads;
    struct job jobs[64];
    pthread_t tids[64];
    size_t per = (npages + t - 1) / t;
    atomic_store(&reported, 0);
    for (int n = 0; n < t; n++) {
        jobs[n] = (struct job){.op = op, .gen = gen, .k = k};
        jobs[n].lo = (size_t)n * per < npages ? (size_t)n * per : npages;
        jobs[n].hi = jobs[n].lo + per < npages ? jobs[n].lo + per : npages;
    }
    int started = 0;
    for (int n = 1; n < t; n++) {
        if (pthread_create(&tids[n], NULL, worker, &jobs[n]) != 0) break;
        started = n;
    }
    worker(&jobs[0]);
    /* Threads that failed to start: do their share here. */
    for (int n = started + 1; n < t; n++) worker(&jobs[n]);
    for (int n = 1; n <= started; n++) pthread_join(tids[n], NULL);
    size_t c = 0, b = 0;
    for (int n = 0; n < t; n++) {
        c += jobs[n].checked;
        b += jobs[n].bad;
    }
    if (checked) *checked = c;
    if (bad) *bad = b;
}

/* Calls fn on maximal runs of pages [a, b) that are contiguous in memory
 * and not gone. */
static int for_runs(size_t a, size_t b, int (*fn)(char *addr, size_t len)) {
    size_t i = a;
    while (i < b) {
        if (state[i] == ST_GONE) {
            i++;
            continue;
        }
        char *start = page_addr(i);
        size_t n = 1;
        while (i + n < b && state[i + n] != ST_GONE && page_addr(i + n) == start + n * PAGE) n++;
        if (fn(start, n * PAGE) < 0) return -1;
        i += n;
    }
    return 0;
}

static int do_dontneed(char *addr, size_t len) {
    return madvise(addr, len, MADV_DONTNEED);
}

static int do_munmap(char *addr, size_t len) {
    return munmap(addr, len);
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

static int parse_range(const char *args, size_t *a, size_t *b) {
    unsigned long long x, y;
    if (sscanf(args, "%llu %llu", &x, &y) != 2 || x >= y || y > npages) return -1;
    *a = x;
    *b = y;
    return 0;
}

static void cmd_fork(void) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        reply("err fork: %s", strerror(errno));
        return;
    }
    if (pid == 0) {
        size_t checked, bad;
        run(OP_VERIFY, 0, 1, &checked, &bad);
        char line[64];
        int n = snprintf(line, sizeof line, "ok %zu %zu\n", checked, bad);
        ssize_t w = write(1, line, (size_t)n);
        (void)w;
        _exit(bad == 0 ? 0 : 1);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) {
            reply("err waitpid: %s", strerror(errno));
            return;
        }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    reply("forked %d %d", code, (int)pid);
}

static void cmd_mremap(const char *args) {
    size_t a, b;
    if (parse_range(args, &a, &b) < 0) {
        reply("err mremap: bad range");
        return;
    }
    if (nrelocs == MAX_RELOC) {
        reply("err mremap: too many relocations");
        return;
    }
    for (size_t i = a; i < b; i++)
        if (state[i] == ST_GONE) {
            reply("err mremap: page %zu is unmapped", i);
            return;
        }
    for (int r = 0; r < nrelocs; r++)
        if (a < relocs[r].b && relocs[r].a < b) {
            reply("err mremap: range overlaps an earlier mremap");
            return;
        }
    size_t len = (b - a) * PAGE;
    char *hole = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (hole == MAP_FAILED) {
        reply("err mremap: mmap: %s", strerror(errno));
        return;
    }
    void *p = mremap(base + a * PAGE, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    if (p == MAP_FAILED) {
        int e = errno;
        munmap(hole, len);
        reply("err mremap: %s", strerror(e));
        return;
    }
    relocs[nrelocs++] = (struct reloc){a, b, p};
    reply("ok %p", p);
}

static void usage(void) {
    fprintf(stderr,
            "usage: workload [--threads T] [--mib N] [--seed S]\n"
            "commands: fill G | verify | write G K | dontneed A B | munmap A B |\n"
            "          mremap A B | fork | touch | rss | exit\n");
}

int main(int argc, char **argv) {
    size_t mib = 64;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--threads"))
            nthreads = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--mib"))
            mib = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && !strcmp(argv[i], "--seed"))
            seed = strtoull(argv[++i], NULL, 0);
        else {
            usage();
            return 2;
        }
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (mib < 1) mib = 1;
    npages = mib * 1024 * 1024 / PAGE;
    base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        perror("workload: mmap");
        return 1;
    }
    madvise(base, npages * PAGE, MADV_NOHUGEPAGE);
    state = calloc(npages, sizeof *state);
    if (!state) {
        perror("workload: calloc");
        return 1;
    }
    reply("ready %p %zu", (void *)base, npages);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        char cmd[32] = "";
        int off = 0;
        if (sscanf(line, "%31s%n", cmd, &off) != 1) continue; /* blank line */
        const char *args = line + off;
        unsigned long long g, k;
        size_t a, b;
        if (!strcmp(cmd, "fill")) {
            if (sscanf(args, "%llu", &g) != 1 || g >= ST_GONE - 1) {
                reply("err fill: need a generation");
                continue;
            }
            run(OP_FILL, g, 1, NULL, NULL);
            reply("ok");
        } else if (!strcmp(cmd, "verify")) {
            size_t checked, bad;
            run(OP_VERIFY, 0, 1, &checked, &bad);
            reply("ok %zu %zu", checked, bad);
        } else if (!strcmp(cmd, "write")) {
            if (sscanf(args, "%llu %llu", &g, &k) != 2 || k == 0 || g >= ST_GONE - 1) {
                reply("err write: need G K (K > 0)");
                continue;
            }
            run(OP_WRITE, g, k, NULL, NULL);
            reply("ok");
        } else if (!strcmp(cmd, "dontneed")) {
            if (parse_range(args, &a, &b) < 0) {
                reply("err dontneed: bad range");
                continue;
            }
            if (for_runs(a, b, do_dontneed) < 0) {
                reply("err dontneed: %s", strerror(errno));
                continue;
            }
            for (size_t i = a; i < b; i++)
                if (state[i] != ST_GONE) state[i] = ST_ZERO;
            reply("ok");
        } else if (!strcmp(cmd, "munmap")) {
            if (parse_range(args, &a, &b) < 0) {
                reply("err munmap: bad range");
                continue;
            }
            if (for_runs(a, b, do_munmap) < 0) {
                reply("err munmap: %s", strerror(errno));
                continue;
            }
            for (size_t i = a; i < b; i++) state[i] = ST_GONE;
            reply("ok");
        } else if (!strcmp(cmd, "mremap")) {
            cmd_mremap(args);
        } else if (!strcmp(cmd, "fork")) {
            cmd_fork();
        } else if (!strcmp(cmd, "touch")) {
            run(OP_TOUCH, 0, 1, NULL, NULL);
            reply("ok");
        } else if (!strcmp(cmd, "rss")) {
            reply("ok %ld", rss_kb());
        } else if (!strcmp(cmd, "exit")) {
            reply("bye");
            return 0;
        } else {
            reply("err unknown command: %.40s", cmd);
        }
    }
    return 0;
}
