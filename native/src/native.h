/* Declarations shared by the cffi build (native/cffi) and the C files
 * that implement the batch helpers. Every function returns 0 or a count on
 * success and -errno on failure: the Python layer turns that into OSError
 * with the call's name, so errno is never read after a second syscall. */
#ifndef UFFDSRV_NATIVE_H
#define UFFDSRV_NATIVE_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* userfaultfd */
int ufs_uffd_open(int flags);
int ufs_uffd_api(int fd, uint64_t features, uint64_t *granted, uint64_t *ioctls);
int ufs_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int ufs_uffd_unregister(int fd, uint64_t start, uint64_t len);
int ufs_uffd_copy_batch(int fd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
                        int n, uint64_t mode, int64_t *result);
int ufs_uffd_zeropage_batch(int fd, const uint64_t *dst, const uint64_t *len, int n,
                            int64_t *result);
int ufs_uffd_writeprotect_batch(int fd, const uint64_t *start, const uint64_t *len, int n,
                                uint64_t mode);
int ufs_uffd_wake_batch(int fd, const uint64_t *start, const uint64_t *len, int n);

/* processes */
int ufs_pidfd_open(int pid, unsigned flags);
int ufs_pidfd_getfd(int pidfd, int targetfd, unsigned flags);
int64_t ufs_process_madvise(int pidfd, const uint64_t *start, const uint64_t *len, int n,
                            int advice);
int64_t ufs_vm_readv(int pid, void *local, const uint64_t *start, const uint64_t *len, int n);
int ufs_zero_pages(const void *buf, int npages, uint8_t *is_zero);
int64_t ufs_tlb_shootdowns(void);
int ufs_kcmp_file(int fd1, int fd2);

/* io_uring (liburing) */
struct ufs_ring;
struct ufs_ring *ufs_ring_new(unsigned entries, int eventfd, int *err);
void ufs_ring_free(struct ufs_ring *r);
int ufs_ring_register_buffer(struct ufs_ring *r, void *base, size_t len);
int ufs_ring_read(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                  uint64_t user_data);
int ufs_ring_write(struct ufs_ring *r, int fd, const void *buf, unsigned len, uint64_t off,
                   uint64_t user_data);
int ufs_ring_read_fixed(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                        uint64_t user_data);
int ufs_ring_write_fixed(struct ufs_ring *r, int fd, const void *buf, unsigned len,
                         uint64_t off, uint64_t user_data);
int ufs_ring_read_flags(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                        int flags, uint64_t user_data);
int ufs_ring_write_flags(struct ufs_ring *r, int fd, const void *buf, unsigned len,
                         uint64_t off, int flags, uint64_t user_data);
int ufs_ring_readv(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                   int n, uint64_t off, uint64_t user_data);
int ufs_ring_writev(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                    int n, uint64_t off, uint64_t user_data);
int ufs_ring_cancel(struct ufs_ring *r, uint64_t target, uint64_t user_data);
int ufs_ring_submit(struct ufs_ring *r);
void ufs_ring_stats(struct ufs_ring *r, uint64_t *submits, uint64_t *entries);
int ufs_ring_pending(struct ufs_ring *r);
int ufs_ring_harvest(struct ufs_ring *r, uint64_t *user_data, int32_t *res, int max);
int ufs_ring_probe_ops(uint8_t *ops, int n);

/* the native fault engine (engine.c): one call per read of uffd messages */
struct ufs_region { /* one managed region; the arrays are numpy's */
    uint64_t start, npages;
    uint8_t *state;
    int64_t *slot;
    int32_t *batch;
    uint8_t *heat;
    uint32_t *stamp;
};
struct ufs_eout { /* something Python must do */
    uint64_t addr, flags; /* HAND/RETRY: the fault; FAILED: npages; READ: offset, length */
    uint32_t tid, client;
    int32_t kind, err;
};
struct ufs_esample { /* n faults of one kind served `ns` after their read */
    uint32_t kind, n;
    uint64_t ns;
};
struct ufs_eview {
    struct ufs_eout *out;
    int nout;
    char *journal; /* FREE records, core/journal.py's format */
    int njournal;
    struct ufs_esample *samples;
    int nsamples;
};
enum {
    UFS_ENGINE_OUT = 1, UFS_ENGINE_JOURNAL = 2, UFS_ENGINE_DIRTY = 4, UFS_ENGINE_EVENTS = 8,
    UFS_ENGINE_NSAMPLES = 2048,
    UFS_OUT_HAND = 0, UFS_OUT_RETRY = 1, UFS_OUT_FAILED = 2, UFS_OUT_ERROR = 3, UFS_OUT_READ = 4,
    UFS_OUT_EVENTS = 5, UFS_OUT_UFFD_ERR = 6, /* a read of the uffd: addr, flags = buffer, bytes */
    UFS_SERVE_SKIP_EVENTS = 1, UFS_SERVE_NOT_READ = 2,
    UFS_OP_COPY = 0, UFS_OP_ZEROPAGE = 1, UFS_OP_UNPROTECT = 2,
    UFS_KIND_ZERO = 0, UFS_KIND_UNPROTECT = 1, UFS_KIND_SWAP = 2, UFS_KIND_TIER = 3,
    /* per-client counters (a uint64_t array of Python's) */
    UFS_C_FAULTS = 0, UFS_C_ZERO, UFS_C_UNPROTECT, UFS_C_SWAP, UFS_C_LOADING, UFS_C_UNKNOWN,
    UFS_C_SWAPPED_IN, UFS_C_READ_BYTES, UFS_C_REFAULTS, UFS_C_READAHEAD, UFS_C_RA_MISSES,
    UFS_C_RESTORED, UFS_C_BUSY, UFS_C_ERR_EAGAIN, UFS_C_ERR_COPY, UFS_C_ERR_ZEROPAGE,
    UFS_C_ERR_SWAP_READ, UFS_C_ERR_UNPROTECT, UFS_C_TIER_FAULTS, UFS_C_TIER_PAGES, UFS_C_N,
    /* engine-wide: what must never happen */
    UFS_ESTAT_BAD_RELEASE = 0, UFS_ESTAT_STRAY, UFS_ESTAT_LOST, UFS_ESTAT_SAMPLES_LOST,
    UFS_ENGINE_NSTATS
};
struct ufs_engine;
struct ufs_eclient;
struct ufs_engine *ufs_engine_new(struct ufs_ring *ring, void *arena, size_t bytes, int *err);
void ufs_engine_free(struct ufs_engine *e);
void ufs_engine_set_swap(struct ufs_engine *e, int fd, int rw_flags, int report_reads,
                         uint16_t *refs, int64_t *counters, uint64_t nslots);
void ufs_engine_set_poll(struct ufs_engine *e, unsigned poll_us);
int ufs_engine_busy(struct ufs_engine *e);
void ufs_engine_stats(struct ufs_engine *e, uint64_t *out);
struct ufs_eclient *ufs_engine_client(struct ufs_engine *e, uint32_t id, int uffd, uint32_t cid,
                                      uint64_t beacon, uint64_t *counters, void *readbuf,
                                      int readlen);
int ufs_engine_arm(struct ufs_eclient *c);
void ufs_engine_publish(struct ufs_eclient *c, const struct ufs_region *regions, int n,
                        uint32_t cid, uint64_t beacon);
void ufs_engine_close(struct ufs_eclient *c);
int ufs_engine_serve(struct ufs_eclient *c, const void *msgs, int nbytes, uint64_t t_ns,
                     int flags);
int ufs_engine_restore(struct ufs_eclient *c, uint64_t start, uint64_t end, int max_loads);
int ufs_engine_view(struct ufs_engine *e, struct ufs_eview *v);
int ufs_ring_ready(struct ufs_ring *r); /* CQEs waiting (a harvest stopped early) */
void ufs_engine_consumed(struct ufs_engine *e, int what);
/* the compressed RAM tier (tier.c): a cache of the disk tier keyed by swap
 * slot; an entry is valid only if stored after the last write of its slot */
struct ufs_tier;
struct ufs_tier_stats {
    uint64_t cap_bytes, pool_bytes;    /* cap; memory the pool holds now (arena pages + index) */
    uint64_t stored_bytes;             /* compressed payload bytes of live entries */
    uint64_t stored_pages, same_pages; /* live entries; of which same-filled */
    uint64_t rejected_pages, evicted_pages, dropped_pages; /* totals since start */
    uint64_t hits, misses, hit_ns;     /* engine/loader lookups; total ns spent in hits */
};
/* codec: 0 = lz4, 1 = zstd (level 1). max_stored: a page that compresses to
 * more bytes goes to disk only. */
struct ufs_tier *ufs_tier_new(uint64_t cap_bytes, uint64_t nslots, int codec, uint32_t max_stored,
                              int *err);
void ufs_tier_free(struct ufs_tier *t);
/* n pages: page i at buf + pos[i]*4096, under slots[i]; old entries of those
 * slots go first, the oldest entries as needed. Returns how many were stored.
 * Thread-safe against lookups, drops and sweeps (it compresses unlocked);
 * a slot dropped while its page is being compressed gets no entry. */
int64_t ufs_tier_store(struct ufs_tier *t, const void *buf, const int64_t *pos,
                       const int64_t *slots, int64_t n);
void ufs_tier_drop(struct ufs_tier *t, const int64_t *slots, int64_t n);
/* 1: the page of slot was decompressed into dst (4096 bytes); 0: not in the pool */
int ufs_tier_load(struct ufs_tier *t, int64_t slot, void *dst);
void ufs_tier_stats(struct ufs_tier *t, struct ufs_tier_stats *out);
/* Drop the entries of every slot whose count (refs, numpy's) is 0: for the
 * slots Python freed without a drop. Returns how many went. */
int64_t ufs_tier_sweep(struct ufs_tier *t, const uint16_t *refs, uint64_t nrefs);
void ufs_engine_set_tier(struct ufs_engine *e, struct ufs_tier *t); /* NULL: no tier */
/* 1: the arena is the ring's registered buffer (READ_FIXED); 0: plain reads */
void ufs_engine_set_fixed(struct ufs_engine *e, int fixed);
#endif
