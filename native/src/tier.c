/* The compressed RAM tier: a cache of the disk tier, keyed by swap slot.
 *
 * Every page stored here is on the swap device already (write-through), so
 * the pool may lose anything at any moment: a full pool drops its oldest
 * entries, a crash drops them all, and neither loses a byte. What keeps it
 * correct is one rule: an entry for slot S is valid only if it was stored
 * after the last write of S. store() drops the slots it is given before it
 * stores them, and whoever frees a slot (its count reaches 0) drops it.
 *
 * The memory, as zsmalloc lays it out for zram and zswap:
 * - one anonymous mapping reserved at start (MAP_NORESERVE: the kernel
 *   gives a page only when it is first written), cut into chunks of
 *   CHUNK_SPAN pages of address space. A chunk belongs to one size class
 *   (objects of 64-byte granularity up to max_stored) and touches only the
 *   first k pages of its span, k in 1..4 chosen per class to waste the
 *   least (zsmalloc's pages_per_zspage); objects may straddle its pages.
 *   The address space is 4x the memory cap, so chunks of any k always fit
 *   and the span never fragments.
 * - a chunk hands out objects from a bump index, then from a free list
 *   kept inside the free objects themselves; when its last object goes,
 *   MADV_DONTNEED gives its pages back to the kernel at once (the pool's
 *   memory is what it holds now, not its high-water mark).
 * - one entry per slot (calloc'd once: no malloc per page), with the
 *   chunk/object/length or, for a same-filled page (all 8-byte words
 *   equal: zram's ZRAM_SAME, which catches more than zero pages), the word
 *   itself and no arena bytes. The entries are threaded on a FIFO in store
 *   order: a full pool evicts from its head, the oldest stored.
 *
 * pool_bytes counts the arena pages held plus the index: the entry array
 * whole (every entry is written at start), and of the chunk array the
 * pages up to the highest chunk ever used (a large calloc is fresh
 * anonymous memory, touched only as chunks come into use). It stays below
 * the cap: the index, counted whole, comes off the cap first.
 *
 * Threads: the engine looks pages up on the event loop's thread while
 * store() runs in a worker (lz4 of a 4096-page batch is ~25 ms, and the
 * faults that would wait behind it on the loop are the tier's whole
 * point). One mutex guards the index and the arena; store() compresses
 * each page into a buffer of its own outside it and takes it only to
 * insert, so a lookup waits for at most one insert, never a compression.
 * The correctness rule under that race: a fault can free slot S (and drop
 * it, finding nothing yet) while S's page is being compressed, and the
 * late insert would then leave an entry for a freed slot, which the
 * slot's next owner would read. So the pool keeps a clock, ticked by every
 * store() as it starts and by every drop; a drop stamps its slots with
 * its tick, and a store inserts a page only if its slot's stamp is not
 * newer than the store's own tick (then stamps it with that tick): a drop
 * any time after store() was called wins, and so does a newer store. The
 * stamps are 32 bits compared by signed difference, so a stamp ~2^31
 * ticks old can only make a store skip a page (the disk has it). zstd's context is one
 * per pool and is not thread-safe: its compressions take a second mutex. */
#define _GNU_SOURCE
#include "native.h"
#include <errno.h>
#include <lz4.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <zstd.h>

#define TPAGE 4096u
#define GRAIN 64u
#define CHUNK_SPAN 4u
#define NONE32 0xFFFFFFFFu
#define NONE16 0xFFFFu
enum { E_NONE, E_DATA, E_SAME };

struct entry {
    uint64_t val;         /* E_SAME: the word; E_DATA: chunk << 16 | object */
    uint32_t prev, next;  /* the FIFO, by slot */
    uint32_t gen;         /* the clock's tick at the slot's last drop (see Threads) */
    uint16_t len;
    uint8_t kind, cls;
};

struct chunk {
    uint32_t prev, next; /* the class's list of chunks with room, or the free list */
    uint16_t inuse, bump, freeh;
    uint8_t cls, live;
};

struct tclass {
    uint32_t size, nobj, pages;
    uint32_t partial; /* chunks with a free object */
};

struct ufs_tier {
    char *arena;
    size_t span;
    uint64_t nslots, nchunks, arena_pages, held_pages, entry_bytes;
    struct entry *ent;
    struct chunk *ch;
    uint32_t free_chunks, fresh; /* chunks given back; first never used */
    uint32_t head, tail;         /* FIFO: oldest, newest */
    uint32_t clock;              /* ticks at each store and each drop */
    int codec, nclass;
    uint32_t max_stored;
    struct tclass cls[TPAGE / GRAIN];
    ZSTD_CCtx *zc;
    ZSTD_DCtx *zd;
    struct ufs_tier_stats st;
    pthread_mutex_t mu;  /* the index, the arena, the stats */
    pthread_mutex_t zmu; /* zc */
};

#define LOCK(t) pthread_mutex_lock(&(t)->mu)
#define UNLOCK(t) pthread_mutex_unlock(&(t)->mu)

static uint64_t tier_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}

struct ufs_tier *ufs_tier_new(uint64_t cap_bytes, uint64_t nslots, int codec, uint32_t max_stored,
                              int *err) {
    if (codec < 0 || codec > 1 || max_stored < GRAIN || max_stored > TPAGE || !nslots ||
        nslots >= NONE32) {
        *err = -EINVAL;
        return NULL;
    }
    struct ufs_tier *t = calloc(1, sizeof *t);
    if (!t) {
        *err = -ENOMEM;
        return NULL;
    }
    t->arena = MAP_FAILED;
    pthread_mutex_init(&t->mu, NULL);
    pthread_mutex_init(&t->zmu, NULL);
    t->codec = codec;
    t->max_stored = max_stored;
    t->nslots = nslots;
    /* the index comes off the cap first; what is left is arena pages, and
     * every arena page can be a chunk of its own (k = 1) */
    uint64_t per_page = TPAGE + sizeof(struct chunk);
    uint64_t ibytes = nslots * sizeof(struct entry);
    if (cap_bytes < ibytes + TPAGE + 4 * per_page) {
        free(t);
        *err = -EINVAL;
        return NULL;
    }
    t->arena_pages = (cap_bytes - ibytes - TPAGE) / per_page; /* a page: the table's rounding */
    t->nchunks = t->arena_pages;
    if (t->nchunks >= NONE32) t->nchunks = t->arena_pages = NONE32 - 1;
    t->entry_bytes = ibytes;
    t->span = (size_t)t->nchunks * CHUNK_SPAN * TPAGE;
    t->ent = calloc(nslots, sizeof *t->ent);
    t->ch = calloc(t->nchunks, sizeof *t->ch);
    t->arena = mmap(NULL, t->span, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (codec == 1) {
        t->zc = ZSTD_createCCtx();
        t->zd = ZSTD_createDCtx();
    }
    if (!t->ent || !t->ch || t->arena == MAP_FAILED || (codec == 1 && (!t->zc || !t->zd))) {
        ufs_tier_free(t);
        *err = -ENOMEM;
        return NULL;
    }
    /* the pool's pages must never be merged into a huge page: a chunk
     * given back must give back its memory */
    madvise(t->arena, t->span, MADV_NOHUGEPAGE);
    for (uint64_t s = 0; s < nslots; s++) t->ent[s].prev = t->ent[s].next = NONE32;
    t->head = t->tail = NONE32;
    t->free_chunks = NONE32;
    t->nclass = (max_stored + GRAIN - 1) / GRAIN;
    for (int c = 0; c < t->nclass; c++) {
        struct tclass *k = &t->cls[c];
        k->size = (c + 1) * GRAIN;
        uint32_t best = 1, waste = TPAGE;
        for (uint32_t p = 1; p <= CHUNK_SPAN; p++) {
            uint32_t w = (p * TPAGE) % k->size * 4 / p; /* per 4 pages */
            if (w < waste) waste = w, best = p;
        }
        k->pages = best;
        k->nobj = best * TPAGE / k->size;
        k->partial = NONE32;
    }
    t->st.cap_bytes = cap_bytes;
    t->st.pool_bytes = t->entry_bytes;
    *err = 0;
    return t;
}

void ufs_tier_free(struct ufs_tier *t) {
    if (!t) return;
    if (t->arena != MAP_FAILED) munmap(t->arena, t->span);
    free(t->ent);
    free(t->ch);
    ZSTD_freeCCtx(t->zc);
    ZSTD_freeDCtx(t->zd);
    pthread_mutex_destroy(&t->mu);
    pthread_mutex_destroy(&t->zmu);
    free(t);
}

/* --- chunks and objects ------------------------------------------------------ */

static char *chunk_addr(const struct ufs_tier *t, uint32_t c) {
    return t->arena + (size_t)c * CHUNK_SPAN * TPAGE;
}

static void list_del(struct ufs_tier *t, uint32_t *head, uint32_t c) {
    struct chunk *k = &t->ch[c];
    if (k->prev != NONE32) t->ch[k->prev].next = k->next;
    else *head = k->next;
    if (k->next != NONE32) t->ch[k->next].prev = k->prev;
    k->prev = k->next = NONE32;
}

static void list_push(struct ufs_tier *t, uint32_t *head, uint32_t c) {
    struct chunk *k = &t->ch[c];
    k->prev = NONE32;
    k->next = *head;
    if (*head != NONE32) t->ch[*head].prev = c;
    *head = c;
}

static void obj_free(struct ufs_tier *t, uint32_t c, uint16_t o) {
    struct chunk *k = &t->ch[c];
    struct tclass *cl = &t->cls[k->cls];
    if (k->inuse == cl->nobj) list_push(t, &cl->partial, c);
    memcpy(chunk_addr(t, c) + (size_t)o * cl->size, &k->freeh, sizeof k->freeh);
    k->freeh = o;
    if (--k->inuse) return;
    /* wholly free: its pages go back to the kernel now */
    list_del(t, &cl->partial, c);
    madvise(chunk_addr(t, c), (size_t)cl->pages * TPAGE, MADV_DONTNEED);
    t->held_pages -= cl->pages;
    k->live = 0;
    list_push(t, &t->free_chunks, c);
}

/* An object of class cls, or 0 when the arena has no room for a chunk. */
static int obj_alloc(struct ufs_tier *t, int cls, uint32_t *c_out, uint16_t *o_out) {
    struct tclass *cl = &t->cls[cls];
    uint32_t c = cl->partial;
    if (c == NONE32) {
        if (t->held_pages + cl->pages > t->arena_pages) return 0;
        if (t->free_chunks != NONE32) {
            c = t->free_chunks;
            list_del(t, &t->free_chunks, c);
        } else if (t->fresh < t->nchunks) {
            c = t->fresh++;
        } else {
            return 0;
        }
        struct chunk *k = &t->ch[c];
        *k = (struct chunk){.prev = NONE32, .next = NONE32, .freeh = NONE16, .cls = cls, .live = 1};
        t->held_pages += cl->pages;
        list_push(t, &cl->partial, c);
    }
    struct chunk *k = &t->ch[c];
    uint16_t o;
    if (k->freeh != NONE16) {
        o = k->freeh;
        memcpy(&k->freeh, chunk_addr(t, c) + (size_t)o * cl->size, sizeof k->freeh);
    } else {
        o = k->bump++;
    }
    if (++k->inuse == cl->nobj) list_del(t, &cl->partial, c);
    *c_out = c;
    *o_out = o;
    return 1;
}

/* --- entries -------------------------------------------------------------------- */

static void fifo_del(struct ufs_tier *t, uint32_t s) {
    struct entry *x = &t->ent[s];
    if (x->prev != NONE32) t->ent[x->prev].next = x->next;
    else t->head = x->next;
    if (x->next != NONE32) t->ent[x->next].prev = x->prev;
    else t->tail = x->prev;
    x->prev = x->next = NONE32;
}

static void fifo_append(struct ufs_tier *t, uint32_t s) {
    struct entry *x = &t->ent[s];
    x->next = NONE32;
    x->prev = t->tail;
    if (t->tail != NONE32) t->ent[t->tail].next = s;
    else t->head = s;
    t->tail = s;
}

/* Forget slot s's entry; 1 if there was one. */
static int forget(struct ufs_tier *t, uint64_t s) {
    struct entry *x = &t->ent[s];
    if (x->kind == E_NONE) return 0;
    fifo_del(t, s);
    if (x->kind == E_DATA) {
        obj_free(t, (uint32_t)(x->val >> 16), (uint16_t)(x->val & 0xFFFF));
        t->st.stored_bytes -= x->len;
    } else {
        t->st.same_pages--;
        t->st.stored_bytes -= sizeof x->val;
    }
    t->st.stored_pages--;
    x->kind = E_NONE;
    return 1;
}

static void account(struct ufs_tier *t) {
    uint64_t chunk_bytes = ((uint64_t)t->fresh * sizeof(struct chunk) + TPAGE - 1) / TPAGE * TPAGE;
    t->st.pool_bytes = t->entry_bytes + chunk_bytes + t->held_pages * TPAGE;
}

/* Slot s was freed or is about to be written: its entry goes, and so does
 * the page of any store() of it still compressing (stamp = tick). Under mu. */
static void drop_locked(struct ufs_tier *t, int64_t s, uint32_t tick) {
    if (s < 0 || (uint64_t)s >= t->nslots) return;
    t->ent[s].gen = tick;
    if (forget(t, s)) t->st.dropped_pages++;
}

/* Dropped (or stored by a newer store) since the store of tick `my` started? */
static int dropped_since(const struct entry *x, uint32_t my) { return (int32_t)(x->gen - my) > 0; }

/* The engine drops a slot it freed (engine.c, not in native.h). */
void ufs_tier_drop_one(struct ufs_tier *t, int64_t s) {
    LOCK(t);
    drop_locked(t, s, ++t->clock);
    account(t);
    UNLOCK(t);
}

void ufs_tier_drop(struct ufs_tier *t, const int64_t *slots, int64_t n) {
    LOCK(t);
    uint32_t tick = ++t->clock;
    for (int64_t i = 0; i < n; i++) drop_locked(t, slots[i], tick);
    account(t);
    UNLOCK(t);
}

int64_t ufs_tier_sweep(struct ufs_tier *t, const uint16_t *refs, uint64_t nrefs) {
    int64_t n = 0;
    LOCK(t);
    uint32_t tick = ++t->clock;
    /* every free slot, not just those with an entry: a store of one may
     * still be compressing */
    for (uint64_t s = 0; s < t->nslots; s++)
        if (s >= nrefs || !refs[s]) {
            t->ent[s].gen = tick;
            n += forget(t, s);
        }
    t->st.dropped_pages += n;
    account(t);
    UNLOCK(t);
    return n;
}

static int same_filled(const void *page, uint64_t *word) {
    const uint64_t *w = page;
    uint64_t v = w[0];
    for (unsigned i = 1; i < TPAGE / sizeof v; i++)
        if (w[i] != v) return 0;
    *word = v;
    return 1;
}

/* Compress one page into out: its length, or 0 if over max_stored. No
 * lock held: lz4's state is on the stack, zstd's context has its own. */
static int compress(struct ufs_tier *t, const char *src, char *out) {
    if (t->codec == 0) return LZ4_compress_default(src, out, TPAGE, t->max_stored);
    pthread_mutex_lock(&t->zmu);
    size_t r = ZSTD_compressCCtx(t->zc, out, t->max_stored, src, TPAGE, 1);
    pthread_mutex_unlock(&t->zmu);
    return ZSTD_isError(r) || r > t->max_stored ? 0 : (int)r;
}

int64_t ufs_tier_store(struct ufs_tier *t, const void *buf, const int64_t *pos,
                       const int64_t *slots, int64_t n) {
    int64_t stored = 0;
    char out[TPAGE + 512] __attribute__((aligned(64)));
    LOCK(t);
    uint32_t my = ++t->clock;
    UNLOCK(t);
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        if (s < 0 || (uint64_t)s >= t->nslots) continue;
        const char *src = (const char *)buf + (size_t)pos[i] * TPAGE;
        uint64_t word = 0;
        int same = 0, len = 0;
        if (pos[i] >= 0 && !(same = same_filled(src, &word))) len = compress(t, src, out);
        LOCK(t);
        struct entry *x = &t->ent[s];
        if (dropped_since(x, my)) { /* freed, written again or stored by a newer store */
            UNLOCK(t);
            continue;
        }
        x->gen = my; /* an older store still compressing this slot must not follow */
        /* the old entry goes: the slot was just written (or is twice in
         * this batch: the last wins) */
        if (forget(t, s)) t->st.dropped_pages++;
        if (pos[i] < 0) {
            account(t);
            UNLOCK(t);
            continue;
        }
        if (!same && len <= 0) {
            t->st.rejected_pages++;
            account(t);
            UNLOCK(t);
            continue;
        }
        if (same) {
            x->kind = E_SAME;
            x->val = word;
            x->len = 0;
            t->st.same_pages++;
            t->st.stored_bytes += sizeof word;
        } else {
            int cls = (len + GRAIN - 1) / GRAIN - 1;
            uint32_t c;
            uint16_t o;
            /* full: the oldest go (they are on the device already) */
            int ok;
            while (!(ok = obj_alloc(t, cls, &c, &o)) && t->head != NONE32) {
                forget(t, t->head);
                t->st.evicted_pages++;
            }
            if (!ok) { /* a cap too small for even one chunk of this class */
                t->st.rejected_pages++;
                account(t);
                UNLOCK(t);
                continue;
            }
            memcpy(chunk_addr(t, c) + (size_t)o * t->cls[cls].size, out, len);
            x->kind = E_DATA;
            x->cls = cls;
            x->len = len;
            x->val = (uint64_t)c << 16 | o;
            t->st.stored_bytes += len;
        }
        t->st.stored_pages++;
        fifo_append(t, s);
        stored++;
        account(t);
        UNLOCK(t);
    }
    return stored;
}

/* The page of slot s into dst, no statistics: 1 hit, 0 miss, -1 a corrupt
 * entry (dropped; the caller reads the device). For engine.c. The lookup
 * and the decompress hold mu: an insert may move the arena under them. */
static int get_locked(struct ufs_tier *t, int64_t s, void *dst) {
    struct entry *x = &t->ent[s];
    if (x->kind == E_SAME) {
        uint64_t *w = dst;
        for (unsigned i = 0; i < TPAGE / sizeof x->val; i++) w[i] = x->val;
        return 1;
    }
    if (x->kind != E_DATA) return 0;
    const char *src = chunk_addr(t, (uint32_t)(x->val >> 16)) +
                      (size_t)(x->val & 0xFFFF) * t->cls[x->cls].size;
    int ok;
    if (t->codec == 0) {
        ok = LZ4_decompress_safe(src, dst, x->len, TPAGE) == (int)TPAGE;
    } else {
        size_t r = ZSTD_decompressDCtx(t->zd, dst, TPAGE, src, x->len);
        ok = !ZSTD_isError(r) && r == TPAGE;
    }
    if (ok) return 1;
    drop_locked(t, s, ++t->clock);
    account(t);
    return -1;
}

int ufs_tier_get(struct ufs_tier *t, int64_t s, void *dst) {
    if (s < 0 || (uint64_t)s >= t->nslots) return 0;
    LOCK(t);
    int r = get_locked(t, s, dst);
    UNLOCK(t);
    return r;
}

/* The engine's bookkeeping of its lookups (engine.c). */
void ufs_tier_count(struct ufs_tier *t, uint64_t hits, uint64_t misses, uint64_t ns) {
    LOCK(t);
    t->st.hits += hits;
    t->st.misses += misses;
    t->st.hit_ns += ns;
    UNLOCK(t);
}

int ufs_tier_load(struct ufs_tier *t, int64_t slot, void *dst) {
    uint64_t t0 = tier_now_ns();
    int r = ufs_tier_get(t, slot, dst);
    if (r > 0) ufs_tier_count(t, 1, 0, tier_now_ns() - t0);
    else ufs_tier_count(t, 0, 1, 0);
    return r > 0;
}

void ufs_tier_stats(struct ufs_tier *t, struct ufs_tier_stats *out) {
    LOCK(t);
    *out = t->st;
    UNLOCK(t);
}
