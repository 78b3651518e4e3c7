/* The native fault engine: one C call per read of uffd messages.
 *
 * The page map stays numpy's: Python publishes, per client, a table of its
 * regions (start, npages and pointers to the state/slot/batch/heat/stamp
 * arrays), sorted by start, and republishes it whenever the map's
 * generation changed, before the engine next runs for that client. The
 * swap file's slot counts (refs, and [used, low]) are numpy's too.
 *
 * serve() handles the PAGEFAULT messages of a read: zero pages in
 * contiguous runs, write-protect releases in runs, and swap-ins queued as
 * READ_FIXED on the ring into a buffer of the fault arena, one read per
 * run of contiguous slots, with readahead by address (core/swapin.py
 * states the rules; this file applies the same ones). Anything unclear
 * (a batch holds the page, the beacon, INFLIGHT) goes back to Python, and
 * so does every address an ioctl refused with EAGAIN (an event is unread:
 * never sleep on it). Completions reach the engine from the ring's harvest
 * (their user_data has ENGINE_TAG set): UFFDIO_COPY in runs, the page map
 * updated, FREE journal records appended to a buffer Python flushes.
 *
 * Rules of the kernel this relies on:
 * - UFFDIO_COPY/ZEROPAGE of a range that stops early (an existing page, an
 *   event unread) returns EAGAIN with the bytes done: the rest is retried.
 * - EEXIST on the first page: someone else filled it; the range is woken.
 * - ESRCH: the mm is gone (the process exited); nothing to serve.
 * - A read completes as task work on the submitting thread: spinning in
 *   user space on the CQ still sees it (the IRQ's return path runs it). */
#define _GNU_SOURCE
#include "native.h"
#include <errno.h>
#include <linux/userfaultfd.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#ifndef UFFD_PAGEFAULT_FLAG_WP
#define UFFD_PAGEFAULT_FLAG_WP (1 << 1)
#endif
#ifndef UFFDIO_WRITEPROTECT
struct uffdio_writeprotect {
    struct uffdio_range range;
    __u64 mode;
};
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)
#endif

#define PAGE 4096ULL
#define RA_MAX 32
#define NSTREAMS 8
#define POLL_MAX_PAGES 4 /* spin after queueing at most this many pages */
#define ENGINE_TAG (1ULL << 63)
#define UFFD_TAG (1ULL << 62) /* with ENGINE_TAG: a read of a client's uffd */
#define CANCEL_TAG (1ULL << 61)
#define JREC 32
#define J_FREE 8
enum { S_EMPTY, S_RESIDENT, S_INFLIGHT, S_SWAPPED, S_LOADING };
enum { K_ZERO, K_UNPROTECT, K_SWAP, K_WAIT, K_HAND };

/* ring.c, for the engine only (not in native.h: cffi need not see them) */
struct io_uring_sqe *ufs_ring_sqe(struct ufs_ring *r);
int ufs_ring_ready(struct ufs_ring *r);
int ufs_ring_dispatch(struct ufs_ring *r);
void ufs_ring_route(struct ufs_ring *r, uint64_t tag, void (*fn)(void *, uint64_t, int32_t),
                    void *ctx);
/* tier.c, for the engine only */
int ufs_tier_get(struct ufs_tier *t, int64_t s, void *dst);
void ufs_tier_drop_one(struct ufs_tier *t, int64_t s);
void ufs_tier_count(struct ufs_tier *t, uint64_t hits, uint64_t misses, uint64_t ns);

struct stream {
    uint32_t tid, window, ahead;
    uint64_t next, used;
};

struct ufs_eclient {
    struct ufs_engine *e;
    uint32_t id, cid;
    int uffd;
    uint64_t beacon;
    const struct ufs_region *reg;
    int nreg;
    uint64_t *cnt;
    struct stream st[NSTREAMS];
    uint64_t tick;
    int loads, closed;
    char *rbuf; /* two halves: a read goes into one while the other is served */
    int rlen, half, reading;
};

struct load {
    struct ufs_eclient *c; /* NULL: free */
    int n, pending, restore, nhit;
    int32_t bad;
    uint32_t tid;
    uint64_t t_ns;
    uint64_t addr[RA_MAX];
    int64_t slot[RA_MAX];
    uint8_t hit[RA_MAX]; /* the page came from the tier: no read */
};

struct ufs_engine {
    struct ufs_ring *ring;
    int swap_fd, rw_flags, report_reads;
    uint16_t *refs;
    int64_t *sc; /* [used, low] */
    uint64_t nslots;
    struct ufs_tier *tier; /* NULL: every swap-in reads the device */
    int fixed;             /* the arena is registered: READ_FIXED */
    char *arena;
    int nloads, nfree, inflight;
    struct load *loads;
    int *freel;
    unsigned poll_us;
    int queued, depth;
    unsigned dev_pages; /* pages queued on the device, ever (wraps) */
    uint64_t stats[UFS_ENGINE_NSTATS];
    struct ufs_eout *out;
    int nout, capout;
    char *jbuf;
    int njb, capjb;
    struct ufs_esample samples[UFS_ENGINE_NSAMPLES];
    int nsamples;
    int pending; /* UFS_ENGINE_* bits since the last view */
};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static uint32_t now_ms(void) { return (uint32_t)(now_ns() / 1000000ULL); }

static void complete(void *ctx, uint64_t ud, int32_t res);
struct load;
static void finish(struct ufs_engine *e, struct load *L);

struct ufs_engine *ufs_engine_new(struct ufs_ring *ring, void *arena, size_t bytes, int *err) {
    struct ufs_engine *e = calloc(1, sizeof *e);
    int n = bytes / (RA_MAX * PAGE);
    if (!e || n < 1 || ((uintptr_t)arena & (PAGE - 1))) {
        free(e);
        *err = e ? -EINVAL : -ENOMEM;
        return NULL;
    }
    e->fixed = 1;
    e->loads = calloc(n, sizeof *e->loads);
    e->freel = calloc(n, sizeof *e->freel);
    e->capout = 1024;
    e->out = calloc(e->capout, sizeof *e->out);
    e->capjb = 1024 * JREC;
    e->jbuf = calloc(1, e->capjb);
    if (!e->loads || !e->freel || !e->out || !e->jbuf) {
        ufs_engine_free(e);
        *err = -ENOMEM;
        return NULL;
    }
    e->ring = ring;
    e->arena = arena;
    e->nloads = e->nfree = n;
    for (int i = 0; i < n; i++) e->freel[i] = n - 1 - i;
    e->swap_fd = -1;
    ufs_ring_route(ring, ENGINE_TAG, complete, e);
    *err = 0;
    return e;
}

void ufs_engine_free(struct ufs_engine *e) {
    if (!e) return;
    if (e->ring) ufs_ring_route(e->ring, 0, NULL, NULL);
    free(e->loads);
    free(e->freel);
    free(e->out);
    free(e->jbuf);
    free(e);
}

void ufs_engine_set_swap(struct ufs_engine *e, int fd, int rw_flags, int report_reads,
                         uint16_t *refs, int64_t *counters, uint64_t nslots) {
    e->swap_fd = fd;
    e->rw_flags = rw_flags;
    e->report_reads = report_reads;
    e->refs = refs;
    e->sc = counters;
    e->nslots = nslots;
}

void ufs_engine_set_poll(struct ufs_engine *e, unsigned poll_us) { e->poll_us = poll_us; }

void ufs_engine_set_tier(struct ufs_engine *e, struct ufs_tier *t) { e->tier = t; }

void ufs_engine_set_fixed(struct ufs_engine *e, int fixed) { e->fixed = fixed; }

int ufs_engine_busy(struct ufs_engine *e) { return e->inflight; }

void ufs_engine_stats(struct ufs_engine *e, uint64_t *out) {
    memcpy(out, e->stats, sizeof e->stats);
}

struct ufs_eclient *ufs_engine_client(struct ufs_engine *e, uint32_t id, int uffd, uint32_t cid,
                                      uint64_t beacon, uint64_t *counters, void *readbuf,
                                      int readlen) {
    struct ufs_eclient *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->rbuf = readbuf;
    c->rlen = readlen;
    c->e = e;
    c->id = id;
    c->uffd = uffd;
    c->cid = cid;
    c->beacon = beacon;
    c->cnt = counters;
    return c;
}

void ufs_engine_publish(struct ufs_eclient *c, const struct ufs_region *regions, int n,
                        uint32_t cid, uint64_t beacon) {
    if (c->closed) return;
    c->reg = regions;
    c->nreg = n;
    c->cid = cid;
    c->beacon = beacon;
}

void ufs_engine_close(struct ufs_eclient *c) {
    /* From here on the engine touches neither the client's arrays nor its
     * uffd (the fd number may be reused); its reads in flight only drop
     * their pins. The last one frees it. */
    c->closed = 1;
    c->reg = NULL;
    c->nreg = 0;
    c->cnt = NULL;
    c->rbuf = NULL;
    if (c->reading) { /* its completion (-ECANCELED) frees it */
        struct io_uring_sqe *sqe = ufs_ring_sqe(c->e->ring);
        if (sqe) {
            io_uring_prep_cancel64(sqe, ENGINE_TAG | UFFD_TAG | (uintptr_t)c, 0);
            io_uring_sqe_set_data64(sqe, ENGINE_TAG | CANCEL_TAG);
            ufs_ring_submit(c->e->ring);
        }
    }
    if (!c->loads && !c->reading) free(c);
}

int ufs_engine_arm(struct ufs_eclient *c) {
    if (c->closed) return -ESRCH;
    if (c->reading) return 0;
    struct io_uring_sqe *sqe = ufs_ring_sqe(c->e->ring);
    if (!sqe) return -EBUSY;
    c->half ^= 1;
    io_uring_prep_read(sqe, c->uffd, c->rbuf + c->half * c->rlen, c->rlen, 0);
    io_uring_sqe_set_data64(sqe, ENGINE_TAG | UFFD_TAG | (uintptr_t)c);
    c->reading = 1;
    c->e->queued++;
    return 0;
}

/* --- outputs ------------------------------------------------------------ */

static void out(struct ufs_engine *e, struct ufs_eclient *c, int kind, uint64_t addr,
                uint64_t flags, uint32_t tid, int32_t err) {
    if (e->nout == e->capout) {
        struct ufs_eout *o = realloc(e->out, 2 * e->capout * sizeof *o);
        if (!o) {
            e->stats[UFS_ESTAT_LOST]++;
            return;
        }
        e->out = o;
        e->capout *= 2;
    }
    e->out[e->nout++] = (struct ufs_eout){.addr = addr, .flags = flags, .tid = tid,
                                          .client = c->id, .kind = kind, .err = err};
    e->pending |= UFS_ENGINE_OUT;
}

static void journal_free(struct ufs_engine *e, struct ufs_eclient *c, uint64_t addr,
                         uint64_t n) {
    if (e->njb + JREC > e->capjb) {
        char *b = realloc(e->jbuf, 2 * e->capjb);
        if (!b) {
            /* a lost FREE is found again at takeover (the page is present) */
            e->stats[UFS_ESTAT_LOST]++;
            return;
        }
        e->jbuf = b;
        e->capjb *= 2;
    }
    char *r = e->jbuf + e->njb; /* struct.Struct("<BxxxIQQQ") */
    memset(r, 0, JREC);
    r[0] = J_FREE;
    memcpy(r + 4, &c->cid, 4);
    memcpy(r + 8, &addr, 8);
    memcpy(r + 16, &n, 8);
    e->njb += JREC;
    e->pending |= UFS_ENGINE_JOURNAL;
}

static void sample(struct ufs_engine *e, int kind, uint32_t n, uint64_t t0) {
    if (!n || !t0) return;
    uint64_t t = now_ns();
    if (e->nsamples == UFS_ENGINE_NSAMPLES) {
        e->stats[UFS_ESTAT_SAMPLES_LOST]++;
        return;
    }
    e->samples[e->nsamples++] = (struct ufs_esample){kind, n, t > t0 ? t - t0 : 0};
    e->pending |= UFS_ENGINE_DIRTY;
}

static inline void count(struct ufs_eclient *c, int what, uint64_t n) {
    if (c->cnt) {
        c->cnt[what] += n;
        c->e->pending |= UFS_ENGINE_DIRTY;
    }
}

int ufs_engine_view(struct ufs_engine *e, struct ufs_eview *v) {
    v->out = e->out;
    v->nout = e->nout;
    v->journal = e->jbuf;
    v->njournal = e->njb;
    v->samples = e->samples;
    v->nsamples = e->nsamples;
    return e->pending;
}

void ufs_engine_consumed(struct ufs_engine *e, int what) {
    if (what & UFS_ENGINE_OUT) e->nout = 0;
    if (what & UFS_ENGINE_JOURNAL) e->njb = 0;
    if (what & UFS_ENGINE_DIRTY) e->nsamples = 0;
    e->pending &= ~what;
}

/* --- slots ----------------------------------------------------------------- */

static void slot_release(struct ufs_engine *e, int64_t s) {
    /* exactly Slots.release: the last reference frees it */
    if (s < 0 || (uint64_t)s >= e->nslots || !e->refs[s]) {
        e->stats[UFS_ESTAT_BAD_RELEASE]++;
        return;
    }
    if (--e->refs[s] == 0) {
        /* a freed slot's entry must go: the slot's next owner is not us */
        if (e->tier) ufs_tier_drop_one(e->tier, s);
        e->sc[0]--;
        if (s < e->sc[1]) e->sc[1] = s;
    }
}

/* --- the page map ------------------------------------------------------------ */

static const struct ufs_region *find(const struct ufs_eclient *c, uint64_t addr, uint64_t *idx) {
    int lo = 0, hi = c->nreg;
    while (lo < hi) { /* the last region starting at or below addr */
        int mid = (lo + hi) / 2;
        if (c->reg[mid].start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!lo) return NULL;
    const struct ufs_region *r = &c->reg[lo - 1];
    if (addr >= r->start + r->npages * PAGE) return NULL;
    *idx = (addr - r->start) / PAGE;
    return r;
}

static int classify(int state, int batch, int wp) {
    if (batch) return K_HAND;
    if (wp) return state == S_EMPTY || state == S_RESIDENT ? K_UNPROTECT : K_HAND;
    if (state == S_EMPTY || state == S_RESIDENT) return K_ZERO;
    if (state == S_SWAPPED) return K_SWAP;
    if (state == S_LOADING) return K_WAIT;
    return K_HAND;
}

/* --- streams (swapin.Streams) --------------------------------------------- */

static int stream_fault(struct ufs_eclient *c, uint32_t tid, uint64_t addr, uint32_t *w) {
    c->tick++;
    int k = -1;
    for (int j = 0; j < NSTREAMS; j++)
        if (c->st[j].used && c->st[j].tid == tid && addr >= c->st[j].next &&
            addr < c->st[j].next + c->st[j].window * PAGE) {
            k = j;
            break;
        }
    if (k >= 0) {
        *w = c->st[k].window * 2 > RA_MAX ? RA_MAX : c->st[k].window * 2;
        c->st[k].ahead = 0;
    } else {
        k = 0;
        for (int j = 1; j < NSTREAMS; j++)
            if (c->st[j].used < c->st[k].used) k = j;
        if (c->st[k].used) count(c, UFS_C_RA_MISSES, c->st[k].ahead);
        c->st[k].tid = tid;
        c->st[k].ahead = 0;
        *w = 1;
    }
    c->st[k].window = *w;
    c->st[k].next = addr + *w * PAGE;
    c->st[k].used = c->tick;
    return k;
}

/* --- swap-in ------------------------------------------------------------------- */

static char *load_buf(struct ufs_engine *e, struct load *L) {
    return e->arena + (size_t)(L - e->loads) * RA_MAX * PAGE;
}

static int bringable(struct ufs_engine *e, const struct ufs_region *r, uint64_t j) {
    int64_t s = r->slot[j];
    return r->state[j] == S_SWAPPED && !r->batch[j] && s >= 0 && (uint64_t)s < e->nslots &&
           e->refs[s];
}

/* Queue the reads of pages lo..hi-1 of region r (those SWAPPED with batch
 * 0, at most RA_MAX). Returns pages queued, 0 if none could be, -1 when
 * every buffer is busy. */
static int start_load(struct ufs_eclient *c, const struct ufs_region *r, uint64_t lo,
                      uint64_t hi, uint32_t tid, uint64_t t_ns, int restore, int stream) {
    struct ufs_engine *e = c->e;
    if (!e->nfree) return -1;
    if (!restore && !bringable(e, r, lo)) return 0; /* the faulting page comes first */
    int li = e->freel[--e->nfree];
    struct load *L = &e->loads[li];
    memset(L, 0, offsetof(struct load, addr));
    char *buf = load_buf(e, L);
    uint64_t t0 = e->tier ? now_ns() : 0;
    int n = 0, nmiss = 0;
    uint64_t looked_miss = 0;
    for (uint64_t j = lo; j < hi && n < RA_MAX; j++) {
        int64_t s = r->slot[j];
        if (!bringable(e, r, j)) continue;
        /* the tier first: a hit is decompressed where the read would land,
         * and the load is the same as without a tier (core/swapin.py's
         * rules), only with fewer reads; a load of hits only reads nothing */
        int hit = e->tier && ufs_tier_get(e->tier, s, buf + n * PAGE) > 0;
        if (e->tier && !hit) looked_miss++;
        L->addr[n] = r->start + j * PAGE;
        L->slot[n] = s;
        L->hit[n] = hit;
        r->state[j] = S_LOADING;
        e->refs[s]++; /* the pin: the slot outlives a REMOVE while read */
        nmiss += !hit;
        n++;
    }
    if (!n) {
        e->freel[e->nfree++] = li;
        return 0;
    }
    if (stream >= 0) c->st[stream].ahead = restore ? 0 : n - 1;
    L->c = c;
    L->n = n;
    L->nhit = n - nmiss;
    L->tid = tid;
    L->t_ns = t_ns;
    L->restore = restore;
    if (e->tier && nmiss) /* a hit riding along a read: its decompress is its cost */
        ufs_tier_count(e->tier, L->nhit, looked_miss, L->nhit ? now_ns() - t0 : 0);
    for (int p = 0; p < n;) { /* one read per run of contiguous slots not in the tier */
        if (L->hit[p]) {
            p++;
            continue;
        }
        int q = p + 1;
        while (q < n && !L->hit[q] && L->slot[q] == L->slot[q - 1] + 1) q++;
        struct io_uring_sqe *sqe = ufs_ring_sqe(e->ring);
        if (!sqe) {
            L->bad = -EBUSY;
            break;
        }
        if (e->fixed)
            io_uring_prep_read_fixed(sqe, e->swap_fd, buf + p * PAGE, (q - p) * PAGE,
                                     L->slot[p] * PAGE, 0);
        else /* the kernel pins the buffer's pages for this read only */
            io_uring_prep_read(sqe, e->swap_fd, buf + p * PAGE, (q - p) * PAGE,
                               L->slot[p] * PAGE);
        sqe->rw_flags = e->rw_flags;
        io_uring_sqe_set_data64(sqe, ENGINE_TAG | ((uint64_t)li << 16) | (q - p));
        L->pending++;
        e->queued++;
        e->dev_pages += q - p;
        p = q;
    }
    c->loads++;
    e->inflight++;
    if (!L->pending && L->bad) {
        complete(e, ENGINE_TAG | ((uint64_t)li << 16), -EBUSY);
    } else if (!L->pending) { /* every page from the tier: put in now */
        e->depth++;
        finish(e, L);
        e->depth--;
        ufs_tier_count(e->tier, n, looked_miss, now_ns() - t0); /* lookups to COPY done */
    }
    return n;
}

static void wake(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range w = {start, len};
    ioctl(uffd, UFFDIO_WAKE, &w);
}

/* Where page p of the load is now: the region and index if it is still
 * LOADING from the same slot in the *current* table, else NULL. */
static const struct ufs_region *still(struct ufs_eclient *c, struct load *L, int p,
                                      uint64_t *i) {
    const struct ufs_region *r = find(c, L->addr[p], i);
    if (r && r->state[*i] == S_LOADING && r->slot[*i] == L->slot[p]) return r;
    return NULL;
}

static void finish(struct ufs_engine *e, struct load *L) {
    struct ufs_eclient *c = L->c;
    int n = L->n;
    if (c->closed) goto unpin;
    const struct ufs_region *where[RA_MAX];
    uint64_t idx[RA_MAX];
    for (int p = 0; p < n; p++) where[p] = still(c, L, p, &idx[p]);
    if (L->bad) {
        count(c, UFS_C_ERR_SWAP_READ, 1);
        for (int p = 0; p < n; p++)
            if (where[p]) where[p]->state[idx[p]] = S_SWAPPED;
        out(e, c, UFS_OUT_FAILED, L->addr[0], n, L->tid, L->bad);
        goto unpin;
    }
    count(c, UFS_C_READ_BYTES, (uint64_t)(n - L->nhit) * PAGE);
    if (e->report_reads)
        for (int p = 0; p < n;) {
            if (L->hit[p]) {
                p++;
                continue;
            }
            int q = p + 1;
            while (q < n && !L->hit[q] && L->slot[q] == L->slot[q - 1] + 1) q++;
            out(e, c, UFS_OUT_READ, L->slot[p] * PAGE, (q - p) * PAGE, 0, 0);
            p = q;
        }
    char done[RA_MAX] = {0};
    char *buf = load_buf(e, L);
    int gone = 0;
    for (int p = 0; p < n && !gone;) { /* one COPY per run still loading */
        if (!where[p]) {
            p++;
            continue;
        }
        int q = p + 1;
        while (q < n && where[q] && L->addr[q] == L->addr[q - 1] + PAGE) q++;
        while (p < q) {
            struct uffdio_copy cp = {.dst = L->addr[p], .src = (uintptr_t)(buf + p * PAGE),
                                     .len = (q - p) * PAGE, .mode = 0};
            int err = ioctl(c->uffd, UFFDIO_COPY, &cp) ? errno : 0;
            int got = cp.copy > 0 ? (int)(cp.copy / PAGE) : 0;
            for (int k = 0; k < got && p + k < q; k++) done[p + k] = 1;
            p += got;
            if (!err) break;
            if (err == EEXIST && !got) { /* this page is there already: woken, done */
                wake(c->uffd, L->addr[p], PAGE);
                done[p++] = 1;
                continue;
            }
            if (err == ESRCH) {
                gone = 1;
            } else if (err == EAGAIN) {
                count(c, UFS_C_ERR_EAGAIN, 1);
            } else if (err != ENOENT && !(err == EEXIST && got)) {
                count(c, UFS_C_ERR_COPY, 1);
                out(e, c, UFS_OUT_ERROR, L->addr[p], UFS_OP_COPY, 0, -err);
            }
            if (!gone && p < q) { /* other threads may wait on these */
                wake(c->uffd, L->addr[p], (q - p) * PAGE);
                out(e, c, UFS_OUT_RETRY, L->addr[p], 0, 0, 0);
            }
            break;
        }
        p = q;
    }
    /* commit, as swapin.loaded does */
    uint32_t t = now_ms();
    int heat = -1;
    if (!L->restore) {
        if (where[0] && done[0]) {
            uint8_t *h = &where[0]->heat[idx[0]];
            if (*h < 255) (*h)++;
        }
        uint64_t i0;
        const struct ufs_region *r0 = find(c, L->addr[0], &i0);
        if (r0) heat = r0->heat[i0];
    }
    int ndone = 0, ntier = 0;
    for (int p = 0; p < n; p++) {
        const struct ufs_region *r = where[p];
        if (!r) continue;
        uint64_t i = idx[p];
        if (!done[p]) {
            r->state[i] = S_SWAPPED;
            continue;
        }
        slot_release(e, r->slot[i]);
        r->slot[i] = -1;
        r->state[i] = S_RESIDENT;
        r->stamp[i] = t;
        if (heat >= 0 && p > 0) r->heat[i] = heat;
        ndone++;
        ntier += L->hit[p];
        if (p == n - 1 || !done[p + 1] || !where[p + 1] || L->addr[p + 1] != L->addr[p] + PAGE) {
            int f = p;
            while (f > 0 && done[f - 1] && where[f - 1] && L->addr[f - 1] + PAGE == L->addr[f])
                f--;
            journal_free(e, c, L->addr[f], p - f + 1);
        }
    }
    count(c, UFS_C_TIER_PAGES, ntier);
    if (L->restore) {
        count(c, UFS_C_RESTORED, ndone);
    } else if (ndone) {
        count(c, UFS_C_SWAPPED_IN, ndone);
        if (done[0]) {
            count(c, UFS_C_REFAULTS, 1);
            count(c, UFS_C_READAHEAD, ndone - 1);
            if (L->hit[0]) count(c, UFS_C_TIER_FAULTS, 1);
            sample(e, L->hit[0] ? UFS_KIND_TIER : UFS_KIND_SWAP, 1, L->t_ns);
        } else {
            count(c, UFS_C_READAHEAD, ndone);
        }
    }
unpin:
    for (int p = 0; p < n; p++) slot_release(e, L->slot[p]);
    L->c = NULL;
    e->freel[e->nfree++] = (int)(L - e->loads);
    e->inflight--;
    if (--c->loads == 0 && c->closed && !c->reading) free(c);
}

static void uffd_read(struct ufs_engine *e, struct ufs_eclient *c, int32_t res);

static void complete(void *ctx, uint64_t ud, int32_t res) {
    struct ufs_engine *e = ctx;
    if (ud & CANCEL_TAG) return;
    if (ud & UFFD_TAG) {
        e->depth++;
        uffd_read(e, (struct ufs_eclient *)(uintptr_t)(ud & ~(ENGINE_TAG | UFFD_TAG)), res);
        e->depth--;
        return;
    }
    uint64_t li = (ud & ~ENGINE_TAG) >> 16;
    if (li >= (uint64_t)e->nloads || !e->loads[li].c) {
        e->stats[UFS_ESTAT_STRAY]++;
        return;
    }
    struct load *L = &e->loads[li];
    int want = (ud & 0xFF) * PAGE;
    if (res != want && !L->bad) L->bad = res < 0 ? res : -EIO;
    if (L->pending) L->pending--;
    e->depth++;
    if (!L->pending) finish(e, L);
    e->depth--;
}

/* --- serving faults ---------------------------------------------------------- */

struct run_list {
    uint64_t a[256];
    int n;
};

static void add(struct run_list *l, uint64_t a) {
    if (l->n < 256) l->a[l->n++] = a;
}

static void sort_unique(struct run_list *l) {
    for (int i = 1; i < l->n; i++) { /* a read holds a few dozen faults */
        uint64_t v = l->a[i];
        int j = i - 1;
        while (j >= 0 && l->a[j] > v) {
            l->a[j + 1] = l->a[j];
            j--;
        }
        l->a[j + 1] = v;
    }
    int k = 0;
    for (int i = 0; i < l->n; i++)
        if (!k || l->a[k - 1] != l->a[i]) l->a[k++] = l->a[i];
    l->n = k;
}

static void zero_fill(struct ufs_eclient *c, struct run_list *l, uint64_t t_ns) {
    struct ufs_engine *e = c->e;
    sort_unique(l);
    int served = 0, stop = 0;
    for (int p = 0; p < l->n;) {
        int q = p + 1;
        while (q < l->n && l->a[q] == l->a[q - 1] + PAGE) q++;
        while (p < q) {
            int err = 0, got = 0;
            if (!stop) {
                struct uffdio_zeropage z = {.range = {l->a[p], (q - p) * PAGE}};
                err = ioctl(c->uffd, UFFDIO_ZEROPAGE, &z) ? errno : 0;
                got = z.zeropage > 0 ? (int)(z.zeropage / PAGE) : 0;
                if (!err) got = q - p;
                if (err == EEXIST && !got) { /* there already: served */
                    wake(c->uffd, l->a[p], PAGE);
                    got = 1;
                    err = 0;
                    if (p + 1 < q) err = -1; /* go on with the rest */
                }
            } else {
                err = EAGAIN;
            }
            for (int k = 0; k < got; k++) {
                uint64_t i;
                const struct ufs_region *r = find(c, l->a[p + k], &i);
                if (r && r->state[i] == S_EMPTY) {
                    r->state[i] = S_RESIDENT;
                    r->stamp[i] = now_ms();
                }
            }
            served += got;
            p += got;
            if (err == -1) continue;
            if (!err) break;
            if (err == EAGAIN) {
                if (!stop) count(c, UFS_C_ERR_EAGAIN, 1);
                stop = 1; /* the mm is changing: the rest after the events */
                for (; p < q; p++) out(e, c, UFS_OUT_RETRY, l->a[p], 0, 0, 0);
            } else if (err == ESRCH || err == ENOENT) {
                p = q;
            } else {
                count(c, UFS_C_ERR_ZEROPAGE, 1);
                out(e, c, UFS_OUT_ERROR, l->a[p], UFS_OP_ZEROPAGE, 0, -err);
                p++;
            }
        }
        p = q;
    }
    sample(e, UFS_KIND_ZERO, served, t_ns);
}

static void unprotect(struct ufs_eclient *c, struct run_list *l, uint64_t t_ns) {
    struct ufs_engine *e = c->e;
    sort_unique(l);
    int served = 0;
    for (int p = 0; p < l->n;) {
        int q = p + 1;
        while (q < l->n && l->a[q] == l->a[q - 1] + PAGE) q++;
        struct uffdio_writeprotect wp = {.range = {l->a[p], (q - p) * PAGE}, .mode = 0};
        int err = ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp) ? errno : 0;
        if (!err) {
            served += q - p;
        } else if (err == EAGAIN) {
            /* the writers wait until the protection is lifted: lift it later */
            count(c, UFS_C_ERR_EAGAIN, 1);
            for (int k = p; k < q; k++)
                out(e, c, UFS_OUT_RETRY, l->a[k], UFFD_PAGEFAULT_FLAG_WP, 0, 0);
        } else if (err != ESRCH && err != ENOENT) {
            count(c, UFS_C_ERR_UNPROTECT, 1);
            out(e, c, UFS_OUT_ERROR, l->a[p], UFS_OP_UNPROTECT, 0, -err);
        }
        p = q;
    }
    sample(e, UFS_KIND_UNPROTECT, served, t_ns);
}

static void settle_ring(struct ufs_engine *e, int reads) {
    if (!e->queued) return;
    e->queued = 0;
    ufs_ring_submit(e->ring);
    /* a small read (a random fault) completes in about the time a wake-up
     * of the loop costs here: catch it spinning; a readahead takes longer */
    if (reads > 0 && reads <= POLL_MAX_PAGES && e->poll_us) {
        uint64_t until = now_ns() + e->poll_us * 1000ULL;
        while (!ufs_ring_ready(e->ring) && now_ns() < until) __builtin_ia32_pause();
    }
    /* reads served from cache complete inside the submit (not from inside
     * a completion: the harvest that runs it goes on until the CQ is empty) */
    if (!e->depth) ufs_ring_dispatch(e->ring);
}

static int has_events(const struct uffd_msg *m, int n) {
    for (int k = 0; k < n; k++)
        if (m[k].event != UFFD_EVENT_PAGEFAULT) return 1;
    return 0;
}

static void serve(struct ufs_eclient *c, const struct uffd_msg *m, int n, uint64_t t_ns,
                  int flags);

/* A read of the uffd completed: the next one goes out at once (into the
 * other half), and the faults are served here; a read that holds events
 * goes to Python whole, and the next read waits until it is applied. */
static void uffd_read(struct ufs_engine *e, struct ufs_eclient *c, int32_t res) {
    c->reading = 0;
    if (c->closed) {
        if (!c->loads) free(c);
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        if (!ufs_engine_arm(c)) ufs_ring_submit(e->ring);
        return;
    }
    if (res < 0) {
        out(e, c, UFS_OUT_UFFD_ERR, 0, 0, 0, res);
        return;
    }
    const struct uffd_msg *m = (const void *)(c->rbuf + c->half * c->rlen);
    int n = res / (int)sizeof *m;
    if (has_events(m, n)) {
        out(e, c, UFS_OUT_EVENTS, (uintptr_t)m, res, 0, 0);
        return;
    }
    ufs_engine_arm(c);
    serve(c, m, n, now_ns(), 0);
}

int ufs_engine_serve(struct ufs_eclient *c, const void *msgs, int nbytes, uint64_t t_ns,
                     int flags) {
    const struct uffd_msg *m = msgs;
    int n = nbytes / (int)sizeof *m;
    if (c->closed) return 0;
    if (!(flags & UFS_SERVE_SKIP_EVENTS) && has_events(m, n)) return UFS_ENGINE_EVENTS;
    serve(c, m, n, t_ns, flags);
    return c->e->pending;
}

static void serve(struct ufs_eclient *c, const struct uffd_msg *m, int n, uint64_t t_ns,
                  int flags) {
    struct ufs_engine *e = c->e;
    struct run_list zero, wp;
    unsigned dev0 = e->dev_pages; /* pages from the tier need no spin on the CQ */
    for (int k0 = 0; k0 < n; k0 += 256) {
        zero.n = wp.n = 0;
        int k1 = k0 + 256 < n ? k0 + 256 : n;
        for (int k = k0; k < k1; k++) {
            if (m[k].event != UFFD_EVENT_PAGEFAULT) continue;
            uint64_t addr = m[k].arg.pagefault.address & ~(PAGE - 1);
            uint64_t flags = m[k].arg.pagefault.flags;
            uint32_t tid = m[k].arg.pagefault.feat.ptid;
            if (!(flags & UFS_SERVE_NOT_READ)) count(c, UFS_C_FAULTS, 1);
            if (addr == c->beacon) {
                out(e, c, UFS_OUT_HAND, addr, flags, tid, 0);
                continue;
            }
            uint64_t i;
            const struct ufs_region *r = find(c, addr, &i);
            if (!r) {
                /* not ours, or not yet: a REMAP may be unread, and then the
                 * fill fails with EAGAIN and is retried after the event */
                count(c, UFS_C_UNKNOWN, 1);
                add(&zero, addr);
                continue;
            }
            int st = r->state[i];
            switch (classify(st, r->batch[i], !!(flags & UFFD_PAGEFAULT_FLAG_WP))) {
            case K_ZERO:
                count(c, UFS_C_ZERO, 1);
                add(&zero, addr);
                break;
            case K_UNPROTECT:
                if (st == S_EMPTY) r->state[i] = S_RESIDENT;
                if (r->heat[i] < 255) r->heat[i]++;
                r->stamp[i] = now_ms();
                count(c, UFS_C_UNPROTECT, 1);
                add(&wp, addr);
                break;
            case K_SWAP: {
                uint32_t w;
                int s = r->slot[i] >= 0 && (uint64_t)r->slot[i] < e->nslots && e->nfree
                            ? stream_fault(c, tid, addr, &w)
                            : -1;
                int got = s < 0 ? -1 : start_load(c, r, i, i + w > r->npages ? r->npages : i + w,
                                                  tid, t_ns, 0, s);
                if (got > 0) {
                    count(c, UFS_C_SWAP, 1);
                } else if (s < 0 && !e->nfree) {
                    count(c, UFS_C_BUSY, 1); /* every buffer busy: on the next turn */
                    out(e, c, UFS_OUT_RETRY, addr, flags, tid, 0);
                } else {
                    out(e, c, UFS_OUT_HAND, addr, flags, tid, 0);
                }
                break;
            }
            case K_WAIT:
                count(c, UFS_C_LOADING, 1);
                break;
            default:
                out(e, c, UFS_OUT_HAND, addr, flags, tid, 0);
            }
        }
        if (wp.n) unprotect(c, &wp, t_ns);
        if (zero.n) zero_fill(c, &zero, t_ns);
    }
    settle_ring(e, (int)(e->dev_pages - dev0));
}

int ufs_engine_restore(struct ufs_eclient *c, uint64_t start, uint64_t end, int max_loads) {
    struct ufs_engine *e = c->e;
    int queued = 0, loads = 0;
    if (c->closed) return -ESRCH;
    for (int k = 0; k < c->nreg && loads < max_loads; k++) {
        const struct ufs_region *r = &c->reg[k];
        uint64_t rend = r->start + r->npages * PAGE;
        if (rend <= start || r->start >= end) continue;
        uint64_t lo = start > r->start ? (start - r->start) / PAGE : 0;
        uint64_t hi = end < rend ? (end - r->start + PAGE - 1) / PAGE : r->npages;
        for (uint64_t i = lo; i < hi && loads < max_loads; i++) {
            if (r->state[i] != S_SWAPPED || r->batch[i]) continue;
            int got = start_load(c, r, i, i + RA_MAX > hi ? hi : i + RA_MAX, 0, 0, 1, -1);
            if (got < 0) goto done;
            if (got == 0) continue; /* a bad slot: left to the fault path */
            queued += got;
            loads++;
            if (e->nfree <= e->nloads / 4) goto done; /* the rest is for faults */
        }
    }
done:
    settle_ring(e, 0);
    return queued;
}
