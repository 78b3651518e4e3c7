/* io_uring through liburing: one ring per server, completions announced on
 * an eventfd that the asyncio loop watches. Prep functions flush the
 * submission queue themselves when it is full, so callers never see EBUSY
 * for a full SQ; they call ufs_ring_submit once per batch. */
#define _GNU_SOURCE
#include "native.h"
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <sys/uio.h>

#define MAX_VECS 1024


struct ufs_ring {
    struct io_uring ring;
    void *fixed_base;
    size_t fixed_len;
    /* iovec arrays must stay valid until the kernel has consumed the SQE:
     * with liburing 2.3 that is at submit time, so one array per pending
     * vectored op in the current submission batch is enough. */
    struct iovec *vecs;
    unsigned vecs_used, vecs_cap;
    uint64_t submits, entries; /* io_uring_enter calls that submitted, SQEs */
    /* completions whose user_data has route_tag set go to route() (the
     * fault engine) instead of back to Python */
    uint64_t route_tag;
    void (*route)(void *ctx, uint64_t user_data, int32_t res);
    void *route_ctx;
};

static int submit(struct ufs_ring *r);

struct ufs_ring *ufs_ring_new(unsigned entries, int eventfd, int *err) {
    struct ufs_ring *r = calloc(1, sizeof *r);
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    r->vecs_cap = 16 * MAX_VECS;
    r->vecs = calloc(r->vecs_cap, sizeof *r->vecs);
    int e = r->vecs ? io_uring_queue_init(entries, &r->ring, 0) : -ENOMEM;
    if (!e && eventfd >= 0) {
        e = io_uring_register_eventfd(&r->ring, eventfd);
        if (e) io_uring_queue_exit(&r->ring);
    }
    if (e) {
        free(r->vecs);
        free(r);
        *err = e;
        return NULL;
    }
    *err = 0;
    return r;
}

void ufs_ring_free(struct ufs_ring *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r->vecs);
    free(r);
}

int ufs_ring_register_buffer(struct ufs_ring *r, void *base, size_t len) {
    struct iovec v = {base, len};
    int e = io_uring_register_buffers(&r->ring, &v, 1);
    if (!e) {
        r->fixed_base = base;
        r->fixed_len = len;
    }
    return e;
}

int ufs_ring_cancel(struct ufs_ring *r, uint64_t target, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        submit(r);
        sqe = io_uring_get_sqe(&r->ring);
    }
    if (!sqe) return -EBUSY;
    io_uring_prep_cancel64(sqe, target, 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

static int submit(struct ufs_ring *r) {
    int n = io_uring_submit(&r->ring);
    if (n > 0) {
        r->submits++;
        r->entries += n;
    }
    return n;
}

int ufs_ring_submit(struct ufs_ring *r) {
    int n = submit(r);
    r->vecs_used = 0;
    return n;
}

void ufs_ring_stats(struct ufs_ring *r, uint64_t *submits, uint64_t *entries) {
    *submits = r->submits;
    *entries = r->entries;
}

static struct io_uring_sqe *get_sqe(struct ufs_ring *r) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        /* not ufs_ring_submit: iovecs taken for the op being prepared
         * must survive until their own SQE is submitted */
        submit(r);
        sqe = io_uring_get_sqe(&r->ring);
    }
    return sqe;
}

int ufs_ring_pending(struct ufs_ring *r) { return io_uring_sq_ready(&r->ring); }

int ufs_ring_read(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                  uint64_t user_data) {
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, len, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ufs_ring_write(struct ufs_ring *r, int fd, const void *buf, unsigned len, uint64_t off,
                   uint64_t user_data) {
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_write(sqe, fd, buf, len, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

static int in_fixed(struct ufs_ring *r, const void *buf, unsigned len) {
    const char *b = buf, *base = r->fixed_base;
    return base && b >= base && b + len <= base + r->fixed_len;
}

int ufs_ring_read_fixed(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                        uint64_t user_data) {
    if (!in_fixed(r, buf, len)) return -EFAULT;
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_read_fixed(sqe, fd, buf, len, off, 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ufs_ring_write_fixed(struct ufs_ring *r, int fd, const void *buf, unsigned len,
                         uint64_t off, uint64_t user_data) {
    if (!in_fixed(r, buf, len)) return -EFAULT;
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_write_fixed(sqe, fd, buf, len, off, 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

/* Reads and writes with per-call RWF_* flags (sqe->rw_flags, as preadv2
 * and pwritev2 take them): RWF_DONTCACHE for a swap file that refuses
 * O_DIRECT. Registered buffers go as READ_FIXED/WRITE_FIXED. */
static int rw_flags(struct ufs_ring *r, int write, int fd, void *buf, unsigned len, uint64_t off,
                    int flags, uint64_t user_data) {
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    if (in_fixed(r, buf, len)) {
        if (write)
            io_uring_prep_write_fixed(sqe, fd, buf, len, off, 0);
        else
            io_uring_prep_read_fixed(sqe, fd, buf, len, off, 0);
    } else if (write) {
        io_uring_prep_write(sqe, fd, buf, len, off);
    } else {
        io_uring_prep_read(sqe, fd, buf, len, off);
    }
    sqe->rw_flags = flags;
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ufs_ring_read_flags(struct ufs_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                        int flags, uint64_t user_data) {
    return rw_flags(r, 0, fd, buf, len, off, flags, user_data);
}

int ufs_ring_write_flags(struct ufs_ring *r, int fd, const void *buf, unsigned len,
                         uint64_t off, int flags, uint64_t user_data) {
    return rw_flags(r, 1, fd, (void *)buf, len, off, flags, user_data);
}

static struct iovec *take_vecs(struct ufs_ring *r, const uint64_t *bufs, const uint64_t *lens,
                               int n) {
    if (n < 1 || n > MAX_VECS) return NULL;
    if (r->vecs_used + n > r->vecs_cap) ufs_ring_submit(r);
    struct iovec *v = r->vecs + r->vecs_used;
    r->vecs_used += n;
    for (int i = 0; i < n; i++) {
        v[i].iov_base = (void *)(uintptr_t)bufs[i];
        v[i].iov_len = lens[i];
    }
    return v;
}

int ufs_ring_readv(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                   int n, uint64_t off, uint64_t user_data) {
    struct iovec *v = take_vecs(r, bufs, lens, n);
    if (!v) return -EINVAL;
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_readv(sqe, fd, v, n, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int ufs_ring_writev(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                    int n, uint64_t off, uint64_t user_data) {
    struct iovec *v = take_vecs(r, bufs, lens, n);
    if (!v) return -EINVAL;
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, v, n, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

/* Routing for the fault engine (engine.c declares these itself; cffi
 * never sees them). */
void ufs_ring_route(struct ufs_ring *r, uint64_t tag, void (*fn)(void *, uint64_t, int32_t),
                    void *ctx) {
    r->route_tag = tag;
    r->route = fn;
    r->route_ctx = ctx;
}

struct io_uring_sqe *ufs_ring_sqe(struct ufs_ring *r) { return get_sqe(r); }

int ufs_ring_ready(struct ufs_ring *r) { return io_uring_cq_ready(&r->ring); }

/* Hand the routed completions at the head of the CQ to the engine; stop
 * at the first that is Python's (the CQ is a FIFO: it waits for the next
 * harvest, and so does everything behind it). */
int ufs_ring_dispatch(struct ufs_ring *r) {
    struct io_uring_cqe *cqe;
    int n = 0;
    while (r->route && !io_uring_peek_cqe(&r->ring, &cqe) && (cqe->user_data & r->route_tag)) {
        uint64_t ud = cqe->user_data;
        int32_t res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        r->route(r->route_ctx, ud, res);
        n++;
    }
    return n;
}

int ufs_ring_harvest(struct ufs_ring *r, uint64_t *user_data, int32_t *res, int max) {
    struct io_uring_cqe *cqes[256];
    int got = 0, routed = 0;
    /* routed completions can go on for ever (the engine serves a fault,
     * the next is there): give Python its turn now and then */
    while (got < max && routed < 4096) {
        unsigned want = max - got < 256 ? max - got : 256;
        unsigned k = io_uring_peek_batch_cqe(&r->ring, cqes, want);
        if (!k) break;
        /* copied out before the advance: a routed completion may queue
         * new reads, and the CQ slots are the kernel's again once seen */
        uint64_t uds[256];
        int32_t rs[256];
        for (unsigned i = 0; i < k; i++) {
            uds[i] = cqes[i]->user_data;
            rs[i] = cqes[i]->res;
        }
        io_uring_cq_advance(&r->ring, k);
        for (unsigned i = 0; i < k; i++) {
            if (r->route && (uds[i] & r->route_tag)) {
                r->route(r->route_ctx, uds[i], rs[i]);
                routed++;
            } else {
                user_data[got] = uds[i];
                res[got] = rs[i];
                got++;
            }
        }
    }
    return got;
}

/* Which io_uring opcodes the running kernel knows: io_uring_get_probe_ring
 * (IORING_REGISTER_PROBE) on a throwaway two-entry ring, so the answer is
 * the kernel's, not liburing's. ops[op] = 1 for each supported opcode
 * below n. Returns how many opcodes the kernel knows (last_op + 1), or
 * -errno: ENOSYS without io_uring, EPERM where it is disabled
 * (kernel.io_uring_disabled), ENOMEM when the probe itself fails. */
int ufs_ring_probe_ops(uint8_t *ops, int n) {
    struct io_uring ring;
    int err = io_uring_queue_init(2, &ring, 0);
    if (err < 0) return err;
    struct io_uring_probe *p = io_uring_get_probe_ring(&ring);
    if (!p) {
        io_uring_queue_exit(&ring);
        return -ENOMEM;
    }
    for (int op = 0; op < n; op++) ops[op] = (uint8_t)io_uring_opcode_supported(p, op);
    int known = p->last_op + 1;
    io_uring_free_probe(p);
    io_uring_queue_exit(&ring);
    return known;
}
