/*
 * policyload: the program whose pages the reclaim-policy benchmark holds
 * at a budget (python -m bench policy).
 *
 *   policyload --mib N --pattern zipf|seq --accesses A [--seed S]
 *              [--warmup W] [--write-fraction F] [--zipf-s X]
 *              [--fill plain|mixed] [--latency]
 *
 * Maps N MiB of private anonymous memory (4 KiB pages: MADV_NOHUGEPAGE),
 * writes every page (first word: the page's index; second word: its write
 * generation, starting at 1), and draws the whole access sequence up front
 * from the seed (the same sequence under every policy):
 *
 *   zipf  page ranks drawn with P(rank k) ~ 1 / k^X (X = 0.99), the ranks
 *         shuffled over the address range so that hot pages are not
 *         adjacent
 *   seq   page 0, 1, ..., N-1, 0, 1, ... (a loop over the whole mapping)
 *
 * --fill mixed fills the rest of each page the way a real heap looks to a
 * compressor, not with zeros (every compressor's best case) nor with
 * random bytes (its worst): the page's class is drawn from the seed, so
 * every run holds the same bytes. lzo-rle (zswap) and lz4 compress the
 * whole at ~2-3x; classes, by share of pages:
 *
 *   50%  text: JSON lines (the same keys, values from a small vocabulary)
 *   25%  records: 64-byte structs of counters, small ints, pointer-like
 *        words sharing their high bits, and zero padding
 *   15%  half zeros: random first half, zero second half
 *   10%  random bytes (incompressible)
 *
 * The first two words (index, generation) and the last stay as with
 * --fill plain, so verification is the same.
 *
 * A fraction F (default 0.1) of the accesses also write: they bump the
 * page's generation in its second word. The sequence and the expected
 * generations live in MAP_SHARED anonymous memory, which the server does
 * not manage, so that they neither count against the budget nor fault.
 *
 * Then it talks on stdin/stdout, one line each way:
 *
 *   -> ready <hex addr> <npages>          (wait for any line)
 *   -> warm <seconds> <W> <mismatches>    after the first W accesses
 *                                         (wait for any line)
 *   -> done <seconds> <A> <checksum> <mismatches>
 *                                         after the next A accesses
 *                                         (wait for any line, then exit)
 *
 * With --latency each access is timed (CLOCK_MONOTONIC, vDSO: ~20 ns on
 * each side of it, on every contender alike) and the done line ends with
 * the p50 and p99 of the measured accesses, in ns:
 *
 *   -> done <seconds> <A> <checksum> <mismatches> <p50_ns> <p99_ns>
 *
 * Every access reads the page's first word and checks it against the
 * index, and the second against the generation last written there; each
 * page that reads back wrong counts one mismatch (the harness asserts 0).
 * The checksum sums the words read, so nothing is optimised away.
 */
#include "bench.h"

#include <errno.h>
#include <math.h>
#include <sys/mman.h>

#define WRITE_BIT 0x80000000u

static uint64_t rng_state;

static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t x = (rng_state += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static double next_unit(void) { /* [0, 1) */
    return (double)(next_u64() >> 11) * (1.0 / 9007199254740992.0);
}

static void die(const char *what) {
    fprintf(stderr, "policyload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: policyload --mib N --pattern zipf|seq --accesses A [--seed S] "
                    "[--warmup W] [--write-fraction F] [--zipf-s X] [--fill plain|mixed] "
                    "[--latency]\n");
    exit(2);
}

/* Memory the server leaves alone: shared anonymous. */
static void *shared(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap (shared)");
    return p;
}

static int wait_line(void) {
    char line[256];
    return fgets(line, sizeof line, stdin) != NULL;
}

static char *base;
static uint64_t *gen;     /* expected generation of each page */
static uint32_t *seq_;    /* the accesses: page index | WRITE_BIT */
static uint32_t *lat;     /* ns of each access (--latency), else NULL */

static const char *const WORDS[] = {
    "the", "of", "and", "request", "user", "session", "cache", "value", "key", "error",
    "null", "true", "false", "id", "name", "status", "timeout", "connection", "buffer",
    "page", "memory", "index", "count", "total", "server", "client", "http", "json",
    "string", "list", "object", "field", "time", "date", "ok", "data", "type", "size",
    "length", "offset", "read", "write", "open", "close", "path", "file", "node", "tree",
    "hash", "table", "entry", "queue", "event", "thread", "lock", "state", "config",
    "default", "version", "token", "account", "order", "price", "amount",
};
#define NWORDS (sizeof WORDS / sizeof WORDS[0])

static void fill_random(unsigned char *p, size_t n) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t r = next_u64();
        memcpy(p + i, &r, 8);
    }
}

/* Bytes 16 .. PAGE-8 of page p (the words around them are the harness's). */
static void fill_mixed(unsigned char *page, size_t p) {
    unsigned char *b = page + 16, *end = page + PAGE - 8;
    size_t n = (size_t)(end - b);
    double c = next_unit();
    if (c < 0.50) { /* text: JSON lines, as a cache of API answers holds */
        char line[256];
        unsigned ln = 0;
        while (b < end) {
            int l = snprintf(line, sizeof line,
                             "{\"id\":%llu,\"%s\":\"%s\",\"status\":\"%s\",\"count\":%u,"
                             "\"tags\":[\"%s\",\"%s\"]}\n",
                             (unsigned long long)(p * 64 + ln++),
                             WORDS[next_u64() % 16], WORDS[next_u64() % NWORDS],
                             WORDS[next_u64() % 8], (unsigned)(next_u64() % 100),
                             WORDS[next_u64() % 16], WORDS[next_u64() % 16]);
            if (l > end - b) l = (int)(end - b);
            memcpy(b, line, (size_t)l);
            b += l;
        }
    } else if (c < 0.75) { /* records */
        uint64_t heap = 0x00007f0000000000ull | ((next_u64() & 0xffffff) << 16);
        for (size_t i = 0; i + 64 <= n; i += 64) {
            uint64_t r[8] = {0};
            r[0] = p * 64 + i / 64;                    /* a counter */
            r[1] = next_u64() % 1000;                  /* a small int */
            r[2] = heap + ((next_u64() & 0xfff) << 4); /* pointers into one arena */
            r[3] = heap + ((next_u64() & 0xfff) << 4);
            r[4] = next_u64() & 0xffffffffu;           /* a 32-bit hash */
            r[5] = (next_u64() & 1) ? 0x100000001ull : 0;
            memcpy(b + i, r, 64);
        }
    } else if (c < 0.90) { /* half zeros */
        fill_random(b, n / 2);
        memset(b + n / 2, 0, n - n / 2);
    } else {
        fill_random(b, n);
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void run(size_t from, size_t n, double *secs, uint64_t *sum, uint64_t *bad) {
    uint64_t s = 0, b = 0;
    double t0 = bench_now();
    for (size_t k = from; k < from + n; k++) {
        uint64_t a0 = lat ? bench_ns() : 0;
        uint32_t a = seq_[k];
        uint32_t p = a & ~WRITE_BIT;
        volatile uint64_t *w = (volatile uint64_t *)(base + (size_t)p * PAGE);
        uint64_t w0 = w[0], w1 = w[1];
        if (w0 != p || w1 != gen[p]) {
            b++;
            if (b <= 5)
                fprintf(stderr, "policyload: page %u reads %llu/%llu, want %u/%llu\n", p,
                        (unsigned long long)w0, (unsigned long long)w1, p,
                        (unsigned long long)gen[p]);
        }
        s += w0 + w1;
        if (a & WRITE_BIT) {
            gen[p] = w1 + 1;
            w[1] = gen[p];
        }
        if (lat) {
            uint64_t d = bench_ns() - a0;
            lat[k] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
        }
    }
    *secs = bench_now() - t0;
    *sum += s;
    *bad = b;
}

int main(int argc, char **argv) {
    size_t mib = 0, accesses = 0, warmup = 0;
    uint64_t seed = 1;
    double write_fraction = 0.1, zs = 0.99;
    const char *pattern = NULL, *fill = "plain";
    int latency = 0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--latency")) {
            latency = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(o, "--mib")) mib = strtoull(v, NULL, 10);
        else if (!strcmp(o, "--pattern")) pattern = v;
        else if (!strcmp(o, "--accesses")) accesses = strtoull(v, NULL, 10);
        else if (!strcmp(o, "--warmup")) warmup = strtoull(v, NULL, 10);
        else if (!strcmp(o, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(o, "--write-fraction")) write_fraction = strtod(v, NULL);
        else if (!strcmp(o, "--zipf-s")) zs = strtod(v, NULL);
        else if (!strcmp(o, "--fill")) fill = v;
        else usage();
    }
    if (!mib || !accesses || !pattern || write_fraction < 0 || write_fraction > 1
        || (strcmp(pattern, "zipf") && strcmp(pattern, "seq"))
        || (strcmp(fill, "plain") && strcmp(fill, "mixed")))
        usage();
    size_t npages = mib * (1 << 20) / PAGE, total = warmup + accesses;
    if (npages >= WRITE_BIT) usage();

    base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
    if (base == MAP_FAILED) die("mmap");
    if (madvise(base, npages * PAGE, MADV_NOHUGEPAGE)) die("madvise(MADV_NOHUGEPAGE)");
    gen = shared(npages * sizeof *gen);
    seq_ = shared(total * sizeof *seq_);
    if (latency) lat = shared(total * sizeof *lat);

    rng_state = seed;
    if (!strcmp(pattern, "zipf")) {
        /* the CDF over ranks, and a random rank -> page placement */
        double *cdf = shared(npages * sizeof *cdf);
        uint32_t *perm = shared(npages * sizeof *perm);
        double acc = 0;
        for (size_t k = 0; k < npages; k++) {
            acc += 1.0 / pow((double)(k + 1), zs);
            cdf[k] = acc;
        }
        for (size_t k = 0; k < npages; k++) perm[k] = (uint32_t)k;
        for (size_t k = npages - 1; k > 0; k--) {
            size_t j = next_u64() % (k + 1);
            uint32_t t = perm[k];
            perm[k] = perm[j];
            perm[j] = t;
        }
        for (size_t i = 0; i < total; i++) {
            double u = next_unit() * acc;
            size_t lo = 0, hi = npages - 1; /* first k with cdf[k] > u */
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (cdf[mid] > u) hi = mid;
                else lo = mid + 1;
            }
            seq_[i] = perm[lo];
        }
        munmap(cdf, npages * sizeof *cdf);
        munmap(perm, npages * sizeof *perm);
    } else {
        for (size_t i = 0; i < total; i++) seq_[i] = (uint32_t)(i % npages);
    }
    for (size_t i = 0; i < total; i++)
        if (next_unit() < write_fraction) seq_[i] |= WRITE_BIT;

    int mixed = !strcmp(fill, "mixed");
    for (size_t p = 0; p < npages; p++) {
        uint64_t *w = (uint64_t *)(base + p * PAGE);
        if (mixed) fill_mixed((unsigned char *)w, p);
        gen[p] = 1;
        w[0] = p;
        w[1] = 1;
        w[PAGE / 8 - 1] = p ^ seed; /* a little more than two words per page */
    }
    printf("ready %lx %zu\n", (unsigned long)base, npages);
    fflush(stdout);
    if (!wait_line()) return 0;

    double secs;
    uint64_t sum = 0, bad_warm = 0, bad = 0;
    run(0, warmup, &secs, &sum, &bad_warm);
    printf("warm %.6f %zu %llu\n", secs, warmup, (unsigned long long)bad_warm);
    fflush(stdout);
    if (!wait_line()) return 0;

    run(warmup, accesses, &secs, &sum, &bad);
    printf("done %.6f %zu %llu %llu", secs, accesses, (unsigned long long)sum,
           (unsigned long long)(bad + bad_warm));
    if (lat && accesses) {
        uint32_t *m = lat + warmup;
        qsort(m, accesses, sizeof *m, cmp_u32);
        printf(" %u %u", m[accesses / 2], m[(size_t)((double)accesses * 0.99)]);
    }
    printf("\n");
    fflush(stdout);
    wait_line();
    return 0;
}
