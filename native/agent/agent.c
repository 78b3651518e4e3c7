/*
 * uffdsrv agent: the part of the memory manager that lives inside the
 * managed process.
 *
 * Why there is an agent at all
 * ----------------------------
 * The server can do almost everything to another process's memory through
 * a userfaultfd that the process created and handed over: register ranges,
 * write-protect them, read them out, fill them back with UFFDIO_COPY. The
 * one thing it cannot do is drop pages: process_madvise(MADV_DONTNEED) on
 * another process is refused (EINVAL); only the caller's own mm accepts it.
 * So the agent does exactly two jobs: it creates the uffd and gives the
 * server a copy, and it runs a thread that zaps what the server asks for,
 * up to 1024 ranges in one vectored call so that one TLB shootdown covers
 * the whole batch.
 *
 * Why it is built this way
 * ------------------------
 * It runs inside somebody else's program, usually via LD_PRELOAD, so:
 *
 *  - The program must always start. Every failure in the constructor
 *    prints one line and leaves the process unmanaged; nothing else is
 *    printed, ever, on the success path.
 *
 *  - The uffd is never closed. When the last fd of a uffd goes away the
 *    kernel unregisters every range, and pages the server had reclaimed
 *    silently read back as zeros. Keeping our copy open means that if the
 *    server dies, faults on reclaimed pages wait for the next server
 *    instead of returning garbage. It is moved to a high fd number so that
 *    programs that close a range of low fds are less likely to hit it.
 *
 *  - The zap thread must never touch managed memory. If its stack, its
 *    buffers or a malloc arena it uses were write-protected or zapped, it
 *    would fault on itself in the middle of a zap, and the server (which
 *    may be waiting for that zap) could deadlock with it. So its stack,
 *    TLS (glibc puts it at the top of a caller-supplied stack), receive
 *    buffer, iovec array and state all live in one private mapping that
 *    the server is told about in HELLO and leaves alone. Guard pages on
 *    both sides keep that mapping from merging with a neighbouring program
 *    mapping that might be managed. The thread gets a pointer to its state
 *    and never reads the library's .data/.bss; no malloc, no stdio on its
 *    path; symbols are bound at load time (-z now) so the first call of a
 *    libc function does not run the lazy binder either.
 *
 *  - The zap thread blocks every signal: the program's handlers must not
 *    run on our tiny stack, and EINTR must not cut a zap in half.
 *
 *  - If the server goes away the thread reconnects (every 100 ms, or every
 *    second while the server answers ERROR) and hands the same uffd to the
 *    new server. It never exits on its own: the process cannot know whether
 *    a server will come back, and the zapped pages are only reachable
 *    through one.
 *
 *  - fork: the child gets a new uffd from the kernel (EVENT_FORK), which
 *    the server reads, but nothing on that uffd names the child's pid. The
 *    agent's beacon page is registered MISSING and never populated in the
 *    parent, so the child's first read of it faults on the child's uffd
 *    with the child's thread id (UFFD_FEATURE_THREAD_ID): that is how the
 *    server learns who the child is. The child then drops the page again
 *    so its own children can do the same, says HELLO (FORKED, no fd: the
 *    child has no uffd of its own) on a new connection, and starts its own
 *    zap thread on the same private stack (threads do not survive fork, so
 *    that stack is free in the child). The parent's connection and uffd
 *    stay with the parent: the child closes its copy of the socket, and
 *    keeps (but never uses) the parent's uffd, since closing it is not
 *    needed and it is CLOEXEC anyway.
 *
 *  - How to zap is asked of the kernel once, at start, on a scratch page
 *    that the server never sees (it is gone before HELLO): the PIDFD_SELF
 *    pseudo-fd is recent (EBADF before), and before 6.13 process_madvise
 *    refuses MADV_DONTNEED whoever the target (EINVAL: only COLD, PAGEOUT,
 *    WILLNEED and COLLAPSE), as on Debian 12's 6.1. So: process_madvise
 *    (PIDFD_SELF), else through a pidfd of our own, else one madvise() per
 *    range. The ranges the server sends are already merged, so the
 *    fallback drops the same pages with as few calls as it can; what it
 *    loses is the shared TLB flush (one shootdown per range instead of one
 *    per batch). UFFDSRV_AGENT_ZAP=madvise|pidfd forces a fallback, for
 *    tests only. If the chosen call later fails as an unknown one would,
 *    the next one down is tried and remembered. A partial result means
 *    the kernel stopped at a failing range: we call again from there so
 *    that the failure itself reports its errno, and then stop. Skipping
 *    the failed range would tell the server that pages it still counts as
 *    resident were dropped, or the other way round.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "uffdsrv.h"
#include "uffdsrv_proto.h"

/* Newer than Debian 12's 6.1 headers, or missing from them. */
#ifndef PIDFD_SELF
#define PIDFD_SELF (-10000) /* PIDFD_SELF_THREAD, Linux >= 6.15 */
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_FEATURE_EVENT_FORK
#define UFFD_FEATURE_EVENT_FORK (1 << 1)
#endif
#ifndef UFFD_FEATURE_EVENT_REMAP
#define UFFD_FEATURE_EVENT_REMAP (1 << 2)
#endif
#ifndef UFFD_FEATURE_EVENT_REMOVE
#define UFFD_FEATURE_EVENT_REMOVE (1 << 3)
#endif
#ifndef UFFD_FEATURE_EVENT_UNMAP
#define UFFD_FEATURE_EVENT_UNMAP (1 << 6)
#endif
#ifndef UFFD_FEATURE_THREAD_ID
#define UFFD_FEATURE_THREAD_ID (1 << 8)
#endif
#ifndef MADV_DONTNEED
#define MADV_DONTNEED 4
#endif

_Static_assert(UFFDSRV_AUTO_MAPS == UFS_HELLO_AUTO_MAPS, "flag values differ");
_Static_assert(sizeof(struct ufs_hdr) == 16, "ufs_hdr");
_Static_assert(sizeof(struct ufs_hello) == 56, "ufs_hello");
_Static_assert(sizeof(struct ufs_hello_ok) == 24, "ufs_hello_ok");
_Static_assert(sizeof(struct ufs_zap) == 24, "ufs_zap");
_Static_assert(sizeof(struct ufs_zap_done) == 32, "ufs_zap_done");
_Static_assert(sizeof(struct ufs_region) == 32, "ufs_region");
_Static_assert(sizeof(struct ufs_error) == 24, "ufs_error");

#define AGENT_API_FEATURES                                                              \
    (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |   \
     UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID)

#define HIGH_FD 900
#define REPLY_TIMEOUT_S 10
#define REGION_BYTES (256 * 1024) /* zap thread stack + buffers */
#define PAGE_SZ 4096UL

enum pm_mode { PM_UNKNOWN, PM_SELF, PM_PIDFD, PM_MADVISE };

/* Everything the zap thread touches. It lives at the top of the private
 * region, above the thread's stack (which grows down towards a guard). */
struct agent {
    int uffd;        /* our own uffd, or -1 (forked child that has none) */
    int sock;        /* control connection, -1 while reconnecting */
    int forked;      /* this process is a fork child of a managed one */
    unsigned flags;  /* HELLO flags chosen at start (AUTO_MAPS) */
    int pidfd;       /* fallback for PIDFD_SELF, opened lazily */
    int pm_mode;
    uint64_t features;
    uint64_t seq;
    uintptr_t map_start; /* whole private mapping, guards included */
    size_t map_len;
    uintptr_t beacon;
    void *stack;
    size_t stack_len;
    struct sockaddr_un addr;
    socklen_t addrlen;
    struct iovec iov[UFS_MAX_ZAP_RANGES];
    _Alignas(16) unsigned char rbuf[UFS_MAX_MSG];
};

/* Touched only by threads of the program (start, register, atfork), never
 * by the zap thread. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct agent *g_st;
static atomic_int g_managed;
static int g_atfork_done;
static atomic_uint_fast64_t g_api_seq = 1;
static char g_status[256] = "not started";

/* ------------------------------------------------------------------ */
/* small helpers, all malloc-free                                      */

static void say_unmanaged(const char *reason) {
    char line[320];
    int n = snprintf(line, sizeof line, "uffdsrv-agent: %s; running unmanaged\n", reason);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

static int move_high(int fd) {
    if (fd < 0 || fd >= HIGH_FD) return fd;
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, HIGH_FD);
    if (nfd < 0) return fd;
    close(fd);
    return nfd;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void set_rcvtimeo(int s, int seconds) {
    struct timeval tv = {seconds, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

static void hdr_init(struct ufs_hdr *h, uint16_t type, uint64_t seq) {
    h->magic = UFS_MAGIC;
    h->version = UFS_VERSION;
    h->type = type;
    h->seq = seq;
}

/* recvmsg that never leaks passed fds into the program: the first one is
 * handed to the caller if it asks, the rest are closed. */
static ssize_t recv_msg(int s, void *buf, size_t len, int *trunc, int *fd_out) {
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 8)];
    } cbuf;
    struct iovec iov = {buf, len};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.buf;
    mh.msg_controllen = sizeof cbuf.buf;
    if (fd_out) *fd_out = -1;
    ssize_t n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    *trunc = (mh.msg_flags & MSG_TRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (fd_out && *fd_out < 0)
                *fd_out = fd;
            else
                close(fd);
        }
    }
    return n;
}

static int connect_server(const struct agent *st) {
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    if (connect(s, (const struct sockaddr *)&st->addr, st->addrlen) < 0) {
        int e = errno;
        close(s);
        return -e;
    }
    return s;
}

enum hello_result { HELLO_DONE = 0, HELLO_NOCONN = 1, HELLO_REFUSED = 2, HELLO_BROKEN = 3 };

/* Connect, send HELLO (attaching fd_to_send if >= 0), wait for HELLO_OK.
 * On HELLO_DONE *sock_out is the connection with its timeout cleared and
 * *fd_in is an fd the server passed back with HELLO_OK (or -1). `why`
 * (may be NULL) gets a reason for the caller's error line. No malloc. */
static int hello_exchange(struct agent *st, uint32_t flags, int fd_to_send, int *sock_out,
                          int *fd_in, char *why, size_t whylen) {
    *fd_in = -1;
    int s = connect_server(st);
    if (s < 0) {
        if (why) snprintf(why, whylen, "cannot connect to %s: %s", st->addr.sun_path, strerror(-s));
        errno = -s; /* for the caller's return value */
        return HELLO_NOCONN;
    }
    s = move_high(s);
    set_rcvtimeo(s, REPLY_TIMEOUT_S);

    struct ufs_hello h;
    memset(&h, 0, sizeof h);
    hdr_init(&h.hdr, UFS_HELLO, ++st->seq);
    h.flags = flags;
    h.uffd_features = st->features;
    h.private_start = st->map_start;
    h.private_len = st->map_len;
    h.beacon_addr = st->beacon;

    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } cbuf;
    struct iovec iov = {&h, sizeof h};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (fd_to_send >= 0) {
        memset(&cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = sizeof cbuf.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd_to_send, sizeof(int));
    }
    if (sendmsg(s, &mh, MSG_NOSIGNAL) != (ssize_t)sizeof h) {
        if (why) snprintf(why, whylen, "cannot send HELLO: %s", strerror(errno));
        close(s);
        return HELLO_BROKEN;
    }

    union {
        struct ufs_hdr hdr;
        struct ufs_hello_ok ok;
        struct ufs_error err;
        char raw[512];
    } r;
    int trunc = 0, fd = -1;
    ssize_t n;
    do {
        n = recv_msg(s, &r, sizeof r, &trunc, &fd);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        if (why) {
            if (n == 0)
                snprintf(why, whylen, "server closed the connection during HELLO");
            else if (errno == EAGAIN || errno == EWOULDBLOCK)
                snprintf(why, whylen, "no HELLO_OK from server within %d s", REPLY_TIMEOUT_S);
            else
                snprintf(why, whylen, "HELLO failed: %s", strerror(errno));
        }
        close(s);
        return HELLO_BROKEN;
    }
    if ((size_t)n < sizeof r.hdr || r.hdr.magic != UFS_MAGIC || r.hdr.version != UFS_VERSION) {
        if (why) snprintf(why, whylen, "bad reply to HELLO (not uffdsrv protocol v%d)", UFS_VERSION);
        if (fd >= 0) close(fd);
        close(s);
        return HELLO_BROKEN;
    }
    if (r.hdr.type == UFS_HELLO_OK && (size_t)n >= sizeof r.ok && !trunc) {
        set_rcvtimeo(s, 0);
        *sock_out = s;
        *fd_in = fd;
        return HELLO_DONE;
    }
    if (fd >= 0) close(fd);
    if (r.hdr.type == UFS_ERROR && (size_t)n >= sizeof r.err) {
        if (why) {
            /* Only printable bytes of the server's text reach stderr. */
            size_t tl = (size_t)n - sizeof r.err;
            if (tl > r.err.len) tl = r.err.len;
            if (tl > 200) tl = 200;
            char text[201];
            for (size_t i = 0; i < tl; i++) {
                unsigned char ch = (unsigned char)r.err.text[i];
                text[i] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
            }
            text[tl] = 0;
            snprintf(why, whylen, "server refused HELLO: %s (%s)", tl ? text : "no reason given",
                     strerror(r.err.error > 0 ? r.err.error : EPROTO));
        }
        close(s);
        return HELLO_REFUSED;
    }
    if (why) snprintf(why, whylen, "unexpected reply type %u to HELLO", r.hdr.type);
    close(s);
    return HELLO_BROKEN;
}

/* ------------------------------------------------------------------ */
/* the zap thread                                                      */

/* process_madvise's contract with madvise(): bytes done up to the first
 * failing range, or -1 with errno when the first one fails. */
static long madvise_each(const struct iovec *iov, size_t n) {
    long total = 0;
    for (size_t i = 0; i < n; i++) {
        if (iov[i].iov_len && madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED) < 0)
            return total ? total : -1;
        total += (long)iov[i].iov_len;
    }
    return total;
}

static long pm_call(struct agent *st, struct iovec *iov, size_t n) {
    if (st->pm_mode == PM_MADVISE) return madvise_each(iov, n);
    if (st->pm_mode == PM_PIDFD) {
        long r = syscall(SYS_process_madvise, st->pidfd, iov, n, MADV_DONTNEED, 0);
        if (r >= 0 || (errno != EINVAL && errno != ENOSYS)) return r;
        /* DONTNEED refused by process_madvise (before 6.13): fall back,
         * unless the ranges themselves are what madvise refuses too. */
        int e = errno;
        long r2 = madvise_each(iov, n);
        if (r2 >= 0) st->pm_mode = PM_MADVISE;
        else errno = e;
        return r2;
    }
    long r = syscall(SYS_process_madvise, PIDFD_SELF, iov, n, MADV_DONTNEED, 0);
    if (r >= 0) {
        st->pm_mode = PM_SELF;
        return r;
    }
    int e = errno;
    if (st->pm_mode == PM_SELF || (e != EBADF && e != EINVAL && e != ESRCH)) return r;
    /* PIDFD_SELF may be unknown to this kernel: try a real pidfd. */
    if (st->pidfd < 0) {
        int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
        if (fd < 0) {
            errno = e;
            return -1;
        }
        st->pidfd = move_high(fd);
    }
    long r2 = syscall(SYS_process_madvise, st->pidfd, iov, n, MADV_DONTNEED, 0);
    if (r2 >= 0) {
        st->pm_mode = PM_PIDFD;
        return r2;
    }
    /* Both failed: the error is about the ranges, not the pseudo-fd. If
     * the errors differ, PIDFD_SELF itself was the problem, and EINVAL
     * through a real pidfd is a kernel that refuses DONTNEED there. */
    if (errno != e) {
        st->pm_mode = PM_PIDFD;
        if (errno == EINVAL) return pm_call(st, iov, n);
    }
    return r2;
}

/* The zap call this kernel takes (see the top of the file), tried on a
 * touched scratch page that must read as zeros afterwards. Runs at start,
 * on the program's thread; the page is unmapped before HELLO. */
static int probe_zap_mode(struct agent *st) {
    const char *force = getenv("UFFDSRV_AGENT_ZAP"); /* tests only */
    if (force && strcmp(force, "madvise") == 0) return PM_MADVISE;
    volatile char *p = mmap(NULL, PAGE_SZ, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return PM_UNKNOWN;
    struct iovec iov = {(void *)p, PAGE_SZ};
    int mode = PM_MADVISE;
    p[0] = 1;
    if (!(force && strcmp(force, "pidfd") == 0) &&
        syscall(SYS_process_madvise, PIDFD_SELF, &iov, 1, MADV_DONTNEED, 0) == (long)PAGE_SZ &&
        p[0] == 0) {
        mode = PM_SELF;
    } else {
        p[0] = 1;
        int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
        if (fd >= 0 &&
            syscall(SYS_process_madvise, fd, &iov, 1, MADV_DONTNEED, 0) == (long)PAGE_SZ &&
            p[0] == 0) {
            mode = PM_PIDFD;
            st->pidfd = move_high(fd);
        } else if (fd >= 0) {
            close(fd);
        }
    }
    munmap((void *)p, PAGE_SZ);
    return mode;
}

static int range_overlaps_private(const struct agent *st, uint64_t start, uint64_t len) {
    uint64_t end = start + len;
    if (end < start) return 1;
    return len && start < st->map_start + st->map_len && st->map_start < end;
}

static void handle_zap(struct agent *st, size_t n, int trunc) {
    const struct ufs_zap *z = (const struct ufs_zap *)st->rbuf;
    struct ufs_zap_done d;
    memset(&d, 0, sizeof d);
    hdr_init(&d.hdr, UFS_ZAP_DONE, z->hdr.seq);

    uint64_t total = 0;
    uint32_t done = 0;
    int err = 0;
    uint32_t count = z->count;
    if (trunc || n < sizeof *z || count < 1 || count > UFS_MAX_ZAP_RANGES ||
        n != sizeof *z + (size_t)count * sizeof(struct ufs_range) || (z->flags & ~UFS_ZAP_MADVISE)) {
        err = EINVAL;
        goto reply;
    }
    for (uint32_t i = 0; i < count; i++) {
        /* Zapping our own stack or buffers would be fatal to this thread. */
        if (range_overlaps_private(st, z->ranges[i].start, z->ranges[i].len)) {
            err = EPERM;
            goto reply;
        }
    }

    if (z->flags & UFS_ZAP_MADVISE) {
        for (uint32_t i = 0; i < count; i++) {
            if (madvise((void *)(uintptr_t)z->ranges[i].start, z->ranges[i].len, MADV_DONTNEED) < 0) {
                err = errno;
                break;
            }
            total += z->ranges[i].len;
            done++;
        }
        goto reply;
    }

    for (uint32_t i = 0; i < count; i++) {
        st->iov[i].iov_base = (void *)(uintptr_t)z->ranges[i].start;
        st->iov[i].iov_len = z->ranges[i].len;
    }
    uint32_t i = 0;
    int tries = 0;
    while (i < count) {
        /* Empty ranges are done by definition; the kernel skips them. */
        while (i < count && st->iov[i].iov_len == 0) {
            i++;
            done++;
        }
        if (i == count) break;
        long r = pm_call(st, &st->iov[i], count - i);
        if (r < 0) {
            if (errno == EINTR && ++tries < 100) continue;
            err = errno;
            break;
        }
        if (r == 0) { /* no progress on a non-empty range: never loop */
            err = EIO;
            break;
        }
        uint64_t left = (uint64_t)r;
        while (left && i < count) {
            if (left >= st->iov[i].iov_len) {
                left -= st->iov[i].iov_len;
                total += st->iov[i].iov_len;
                i++;
                done++;
            } else {
                st->iov[i].iov_base = (char *)st->iov[i].iov_base + left;
                st->iov[i].iov_len -= left;
                total += left;
                left = 0;
            }
        }
    }

reply:
    d.result = total ? (int64_t)total : (err ? -(int64_t)err : 0);
    d.ranges_done = done;
    d.error = err;
    if (st->sock >= 0) send(st->sock, &d, sizeof d, MSG_NOSIGNAL);
}

/* The server is gone: hand our uffd to the next one. Returns when a new
 * connection has said HELLO_OK. */
static void reconnect(struct agent *st) {
    for (;;) {
        sleep_ms(100);
        uint32_t flags = st->flags | UFS_HELLO_RECONNECT;
        if (st->uffd < 0) flags |= UFS_HELLO_FORKED;
        int s = -1, fd_in = -1;
        int r = hello_exchange(st, flags, st->uffd, &s, &fd_in, NULL, 0);
        if (r == HELLO_DONE) {
            if (fd_in >= 0) {
                if (st->uffd < 0)
                    st->uffd = move_high(fd_in);
                else
                    close(fd_in);
            }
            st->sock = s;
            return;
        }
        if (r == HELLO_REFUSED) sleep_ms(900);
    }
}

static void *zap_thread(void *arg) {
    struct agent *st = arg;
    for (;;) {
        if (st->sock < 0) reconnect(st);
        int trunc = 0;
        ssize_t n = recv_msg(st->sock, st->rbuf, sizeof st->rbuf, &trunc, NULL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            /* EBADF: the program closed our fd; the number is not ours
             * any more, so do not close it again. */
            if (!(n < 0 && errno == EBADF)) close(st->sock);
            st->sock = -1;
            continue;
        }
        const struct ufs_hdr *h = (const struct ufs_hdr *)st->rbuf;
        if ((size_t)n < sizeof *h || h->magic != UFS_MAGIC || h->version != UFS_VERSION) continue;
        if (h->type == UFS_ZAP) handle_zap(st, (size_t)n, trunc);
        /* other types: ignored (forward compatibility) */
    }
    return NULL;
}

static int start_zap_thread(struct agent *st) {
    pthread_attr_t attr;
    int e = pthread_attr_init(&attr);
    if (e) return -e;
    e = pthread_attr_setstack(&attr, st->stack, st->stack_len);
    if (!e) e = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (e) {
        pthread_attr_destroy(&attr);
        return -e;
    }
    /* Block everything before creating it, so it is born blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    e = pthread_create(&t, &attr, zap_thread, st);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (!e) pthread_setname_np(t, "uffdsrv-zap");
    return -e;
}

/* ------------------------------------------------------------------ */
/* fork                                                                */

/* g_lock is held across fork so a child never inherits it locked by a
 * thread that does not exist there (a start in progress finishes first). */
static void atfork_prepare(void) {
    pthread_mutex_lock(&g_lock);
}

static void atfork_parent(void) {
    pthread_mutex_unlock(&g_lock);
}

static void atfork_child(void) {
    int saved = errno;
    struct agent *st = g_st;
    pthread_mutex_unlock(&g_lock);
    if (!st || !atomic_load(&g_managed)) goto out;
    atomic_store(&g_managed, 0);

    /* The parent's connection belongs to the parent. */
    if (st->sock >= 0) close(st->sock);
    st->sock = -1;
    /* The inherited uffd is the parent's (the parent keeps its own copy).
     * Close ours: a server taking over after a crash finds each process's
     * uffd in /proc/PID/fd, and in a child that must be the child's own,
     * which the server sends back with HELLO_OK. */
    if (st->uffd >= 0) close(st->uffd);
    st->uffd = -1;
    st->forked = 1;
    /* A pidfd names the parent; PIDFD_SELF names whoever calls. */
    if (st->pidfd >= 0) close(st->pidfd);
    st->pidfd = -1;
    if (st->pm_mode == PM_PIDFD) {
        int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
        if (fd >= 0)
            st->pidfd = move_high(fd);
        else
            st->pm_mode = PM_UNKNOWN;
    }

    /* Fault on the empty, registered beacon: the fault lands on the
     * child's new uffd with our thread id, naming us to the server. */
    (void)*(volatile char *)st->beacon;
    madvise((void *)st->beacon, PAGE_SZ, MADV_DONTNEED);

    char why[256];
    int s = -1, fd_in = -1;
    int r = hello_exchange(st, st->flags | UFS_HELLO_FORKED, -1, &s, &fd_in, why, sizeof why);
    if (r != HELLO_DONE) {
        say_unmanaged(why);
        goto out;
    }
    if (fd_in >= 0) st->uffd = move_high(fd_in);
    st->sock = s;
    int e = start_zap_thread(st);
    if (e) {
        snprintf(why, sizeof why, "cannot start zap thread in fork child: %s", strerror(-e));
        close(st->sock);
        st->sock = -1;
        say_unmanaged(why);
        goto out;
    }
    atomic_store(&g_managed, 1);
out:
    errno = saved;
}

/* ------------------------------------------------------------------ */
/* start                                                               */

static int create_uffd(uint64_t *features, char *why, size_t whylen) {
    int fd = -1;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
    }
    if (fd < 0) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        snprintf(why, whylen, "cannot create userfaultfd: %s", strerror(e));
        return -e;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = AGENT_API_FEATURES};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        snprintf(why, whylen, "UFFDIO_API with fork/remap/remove/unmap/thread-id events: %s",
                 strerror(e));
        close(fd);
        return -e;
    }
    *features = api.features;
    return move_high(fd);
}

static struct agent *map_private(char *why, size_t whylen) {
    size_t total = 4 * PAGE_SZ + REGION_BYTES;
    char *m = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        snprintf(why, whylen, "cannot map private area: %s", strerror(errno));
        return NULL;
    }
    char *beacon = m + PAGE_SZ;
    char *region = m + 3 * PAGE_SZ;
    if (mprotect(beacon, PAGE_SZ, PROT_READ | PROT_WRITE) < 0 ||
        mprotect(region, REGION_BYTES, PROT_READ | PROT_WRITE) < 0) {
        snprintf(why, whylen, "cannot set up private area: %s", strerror(errno));
        munmap(m, total);
        return NULL;
    }
    size_t st_bytes = (sizeof(struct agent) + PAGE_SZ - 1) & ~(PAGE_SZ - 1);
    struct agent *st = (struct agent *)(region + REGION_BYTES - st_bytes);
    memset(st, 0, sizeof *st);
    st->uffd = st->sock = st->pidfd = -1;
    st->map_start = (uintptr_t)m;
    st->map_len = total;
    st->beacon = (uintptr_t)beacon;
    st->stack = region;
    st->stack_len = REGION_BYTES - st_bytes;
    return st;
}

static void set_status(const char *s) {
    snprintf(g_status, sizeof g_status, "%s", s);
}

static int agent_start_locked(const char *socket_path, unsigned flags, char *why, size_t whylen) {
    if (!socket_path || !*socket_path) {
        snprintf(why, whylen, "no socket path");
        return -EINVAL;
    }
    if (flags & ~UFFDSRV_AUTO_MAPS) {
        snprintf(why, whylen, "unknown flags 0x%x", flags);
        return -EINVAL;
    }
    if (atomic_load(&g_managed)) {
        struct agent *st = g_st;
        if (strcmp(st->addr.sun_path, socket_path) == 0 && st->flags == flags) return 0;
        snprintf(why, whylen, "already started with another socket or flags");
        return -EBUSY;
    }
    size_t plen = strlen(socket_path);
    if (plen >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        snprintf(why, whylen, "socket path too long");
        return -ENAMETOOLONG;
    }

    uint64_t features = 0;
    int uffd = create_uffd(&features, why, whylen);
    if (uffd < 0) return uffd;

    struct agent *st = map_private(why, whylen);
    if (!st) {
        close(uffd);
        return -ENOMEM;
    }
    st->uffd = uffd;
    st->features = features;
    st->flags = flags;
    st->pm_mode = probe_zap_mode(st);
    st->addr.sun_family = AF_UNIX;
    memcpy(st->addr.sun_path, socket_path, plen + 1);
    st->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);

    int s = -1, fd_in = -1;
    int r = hello_exchange(st, flags, uffd, &s, &fd_in, why, whylen);
    int herr = errno;
    if (r != HELLO_DONE) {
        /* Before HELLO went out nobody else knows the mapping: drop it.
         * After, a server may have registered its beacon, and munmap would
         * then wait on an UNMAP event that nobody reads: leave it. */
        if (r == HELLO_NOCONN) munmap((void *)st->map_start, st->map_len);
        close(uffd);
        if (r == HELLO_NOCONN) return herr > 0 ? -herr : -ECONNREFUSED;
        return r == HELLO_REFUSED ? -EPERM : -EPROTO;
    }
    if (fd_in >= 0) close(fd_in);
    st->sock = s;

    int e = start_zap_thread(st);
    if (e) {
        snprintf(why, whylen, "cannot start zap thread: %s", strerror(-e));
        close(s);
        /* The server holds the uffd now; ours must stay open (see top). */
        return e;
    }
    g_st = st;
    if (!g_atfork_done) {
        e = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
        if (e == 0) g_atfork_done = 1;
        /* Without the handler a forked child simply has no zap thread. */
    }
    atomic_store(&g_managed, 1);
    return 0;
}

UFFDSRV_API int uffdsrv_agent_start(const char *socket_path, unsigned flags) {
    char why[256] = "";
    pthread_mutex_lock(&g_lock);
    int r = agent_start_locked(socket_path, flags, why, sizeof why);
    /* which zap call the kernel took, for those who ask (and the tests) */
    static const char *const zap[] = {"managed", "managed (zap: process_madvise PIDFD_SELF)",
                                      "managed (zap: process_madvise pidfd)",
                                      "managed (zap: madvise per range)"};
    if (r == 0)
        set_status(zap[g_st->pm_mode]);
    else if (!atomic_load(&g_managed))
        set_status(why[0] ? why : strerror(-r));
    pthread_mutex_unlock(&g_lock);
    return r;
}

UFFDSRV_API const char *uffdsrv_agent_status(void) {
    return g_status;
}

/* ------------------------------------------------------------------ */
/* REGISTER / UNREGISTER: a short-lived second connection              */

static int region_request(uint16_t type, void *addr, size_t len) {
    if (!addr || !len || (uintptr_t)addr + len < (uintptr_t)addr) return -EINVAL;
    pthread_mutex_lock(&g_lock);
    struct agent *st = atomic_load(&g_managed) ? g_st : NULL;
    pthread_mutex_unlock(&g_lock);
    if (!st) return -ENOTCONN;

    int s = connect_server(st);
    if (s < 0) return s;
    set_rcvtimeo(s, REPLY_TIMEOUT_S);
    struct timeval tv = {REPLY_TIMEOUT_S, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    struct ufs_region m;
    memset(&m, 0, sizeof m);
    uint64_t seq = atomic_fetch_add(&g_api_seq, 1);
    hdr_init(&m.hdr, type, seq);
    m.start = (uintptr_t)addr;
    m.len = len;
    int ret;
    if (send(s, &m, sizeof m, MSG_NOSIGNAL) != (ssize_t)sizeof m) {
        ret = -errno;
        goto out;
    }
    for (;;) {
        union {
            struct ufs_hdr hdr;
            struct ufs_error err;
            char raw[1024];
        } r;
        int trunc = 0;
        ssize_t n = recv_msg(s, &r, sizeof r, &trunc, NULL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ret = (errno == EAGAIN || errno == EWOULDBLOCK) ? -ETIMEDOUT : -errno;
            break;
        }
        if (n == 0) {
            ret = -ECONNRESET;
            break;
        }
        if ((size_t)n < sizeof r.hdr || r.hdr.magic != UFS_MAGIC || r.hdr.version != UFS_VERSION) {
            ret = -EPROTO;
            break;
        }
        if (r.hdr.type == UFS_OK) {
            ret = 0;
            break;
        }
        if (r.hdr.type == UFS_ERROR) {
            ret = ((size_t)n >= sizeof r.err && r.err.error > 0) ? -r.err.error : -EIO;
            break;
        }
        /* anything else: not for us, keep waiting */
    }
out:
    close(s);
    return ret;
}

UFFDSRV_API int uffdsrv_register(void *addr, size_t len) {
    return region_request(UFS_REGISTER, addr, len);
}

UFFDSRV_API int uffdsrv_unregister(void *addr, size_t len) {
    return region_request(UFS_UNREGISTER, addr, len);
}

/* ------------------------------------------------------------------ */
/* LD_PRELOAD entry                                                    */

__attribute__((constructor)) static void uffdsrv_agent_init(void) {
    const char *path = getenv("UFFDSRV_SOCKET");
    if (!path || !*path) return;
    int saved = errno;
    unsigned flags = UFFDSRV_AUTO_MAPS;
    const char *am = getenv("UFFDSRV_AUTO_MAPS");
    if (am && strcmp(am, "0") == 0) flags = 0;
    if (uffdsrv_agent_start(path, flags) != 0) say_unmanaged(uffdsrv_agent_status());
    errno = saved;
}
