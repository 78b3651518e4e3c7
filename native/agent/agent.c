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
 * server a copy, and it runs a zapper that drops what the server asks for,
 * up to 1024 ranges in one vectored call so that one TLB shootdown covers
 * the whole batch.
 *
 * Why the zapper is a helper process, not a thread
 * -------------------------------------------------
 * The zapper needs the program's mm and nothing else of it. A thread would
 * share everything, and each shared thing broke real programs:
 *
 *  - the fd table: programs that closefrom(3)/close_range and reuse the
 *    numbers made a zap thread talk to (and close) the program's own files,
 *    and every exec'd child saw our fds;
 *  - the thread group: unshare(CLONE_NEWUSER) and setns() into user or
 *    mount namespaces need a single-threaded caller (EINVAL otherwise:
 *    bwrap, podman, nsenter, runc), and a main thread ending in
 *    pthread_exit() left the process alive for as long as the zap thread.
 *
 * So the constructor clone()s a helper with CLONE_VM and without
 * CLONE_THREAD, CLONE_SIGHAND, CLONE_FS and CLONE_FILES, exit signal 0.
 * The kernel then gives it the program's mm (PIDFD_SELF, a pidfd of the
 * program and madvise() all drop the program's pages: process_madvise only
 * refuses DONTNEED for an mm other than the caller's) but its own fd table
 * (a copy taken at clone), its own fs_struct, its own signal handlers, and
 * a thread group of its own. Exit signal 0 makes it a "clone child": the
 * program's wait()/waitpid(-1) never see it, only __WCLONE/__WALL do, and
 * the kernel reparents it (with SIGCHLD) to the reaper when the program's
 * last thread exits. The constructor creates the uffd, connects and says
 * HELLO from the program's own thread (so SO_PEERCRED names the program),
 * clones the helper, and then *closes its own copies* of the uffd, the
 * socket and the pidfd: from then on our fds exist only in the helper's
 * table, where no closefrom() of the program reaches and no exec'd child
 * inherits them. CLONE_UNTRACED keeps a debugger or strace -f that follows
 * clones from taking the helper for a thread of the program.
 *
 * What the helper may call
 * ------------------------
 * It runs on the program's memory image with a copy of the cloning
 * thread's registers, so it shares glibc's state: its locks (malloc, stdio,
 * the loader), its errno and TLS model, its atfork lists. A lock taken by a
 * program thread is never released for the helper, and the helper's errno
 * would be some program thread's. So the helper calls no glibc function
 * that touches errno, TLS, locks or malloc: every call is a raw `syscall`
 * instruction (raw_syscall6 below, -errno on failure), plus memcpy/memset.
 * It gets a TLS block of its own (CLONE_SETTLS: a small fake TCB inside its
 * private mapping, so even a stray TLS access lands in memory that is ours
 * and does not go away when the cloning thread exits), and the agent is
 * built with -fno-stack-protector (the canary lives in TLS). Its name is
 * "uffdsrv-zap" (PR_SET_NAME) and it blocks every signal, the glibc
 * internal ones included: the program's handlers must never run on our
 * tiny stack, EINTR must not cut a zap in half, and a Ctrl-C or Ctrl-Z sent
 * to the process group must not stop the zapper of a program that ignores
 * it.
 *
 *  - The helper must never touch managed memory. If its stack or buffers
 *    were write-protected or zapped, it would fault on itself in the middle
 *    of a zap, and the server (which may be waiting for that zap) could
 *    deadlock with it. Its stack, TLS, receive buffer, iovec array and
 *    state all live in one private mapping that the server is told about in
 *    HELLO and leaves alone, with guard pages on both sides so it never
 *    merges with a neighbouring managed mapping. Symbols are bound at load
 *    (-z now), so no call runs the lazy binder.
 *
 *  - The helper ends when the program ends or execs, and never keeps an old
 *    mm alive. It polls a pidfd of the program (readable once the whole
 *    thread group has exited, so a main thread in pthread_exit() with a
 *    worker still running does not end it) together with its socket, and on
 *    every wake-up (at least once a second) and before each reconnect it
 *    checks kcmp(self, parent, KCMP_VM) == 0: an exec gives the program a
 *    new mm, and a program that died leaves the helper reparented to a
 *    reaper. Otherwise it exits (raw SYS_exit).
 *
 *  - The uffd is never closed while the program lives. When the last fd of
 *    a uffd goes away the kernel unregisters every range, and pages the
 *    server had reclaimed silently read back as zeros. The helper's copy
 *    keeps faults on reclaimed pages waiting for the next server if this
 *    one dies.
 *
 *  - If the server goes away the helper reconnects (every 100 ms, or every
 *    second while the server answers ERROR) and hands the same uffd to the
 *    new server. Its SO_PEERCRED names the helper, not the program, so
 *    those HELLOs carry UFS_HELLO_HELPER: the server maps the helper's pid
 *    to its parent, and only if kcmp(KCMP_VM) says they share one mm.
 *
 *  - Whom we talk to: the socket path comes from secure_getenv (ignored in
 *    a setuid or file-capability program), and every connection checks the
 *    listener's SO_PEERCRED: root or the program's own real uid, else the
 *    program runs unmanaged. Otherwise a user could point a privileged
 *    program at a listener of their own and receive its uffd.
 *
 *  - The program must always start. Every failure in the constructor
 *    prints one line ("running unmanaged") on fd 2, if fd 2 is open, and
 *    leaves the process unmanaged; nothing is ever printed after that (a
 *    daemon may have reused fd 2 for a file of its own).
 *
 *  - fork: the child gets a new uffd from the kernel (EVENT_FORK), which
 *    the server reads, but nothing on that uffd names the child's pid. The
 *    agent's beacon page is registered MISSING and never populated in the
 *    parent, so the child's first read of it faults on the child's uffd
 *    with the child's thread id (UFFD_FEATURE_THREAD_ID): that is how the
 *    server learns who the child is, and why the read stays on the child's
 *    own thread. The atfork handler then only opens a pidfd of the child and
 *    clones the child's helper (the parent's helper does not exist in the
 *    child: fork copies one thread), and returns: no connect, no HELLO and
 *    no wait inside fork(). The child's helper drops the beacon page again
 *    (so the child's own children can do the same; the REMOVE that raises
 *    waits on the server, which must not hold up fork), says HELLO
 *    FORKED|HELPER, and keeps the child's uffd that the server sends back.
 *    The fd numbers the parent's helper used mean nothing in the child (its
 *    table is a copy of the program's, not the helper's), so nothing there
 *    is closed.
 *
 *  - Programs that do not run as root. /dev/userfaultfd is 0600 root, and
 *    the userfaultfd() syscall gives an unprivileged caller at most
 *    UFFD_USER_MODE_ONLY (vm.unprivileged_userfaultfd = 0), under which a
 *    kernel fault on our ranges (write(fd, zapped_buf)) fails with EFAULT.
 *    So where the open fails with EACCES/EPERM the agent asks the server
 *    for its open device (DEVICE, answered OK with the fd): the device's
 *    permission was checked at the server's open, USERFAULTFD_IOC_NEW on
 *    it makes a uffd for the caller's own mm, and the device fd is closed
 *    at once. UFFDIO_API refuses UFFD_FEATURE_EVENT_FORK without
 *    CAP_SYS_PTRACE (EPERM, before it sets anything): the same uffd is
 *    asked for the other features, and HELLO says what it got. Without
 *    fork events the child's copy of every registered range is
 *    unregistered and a page we zapped reads as zeros there, so the
 *    atfork prepare handler holds the helper's zaps (zap_gate: an atomic
 *    in our mapping that the helper takes around each zap and answers
 *    EAGAIN, nothing zapped, while it is held) and, unless nothing was
 *    zapped since the pages were last all back, has the server bring every
 *    page back first (FORK_PREPARE; see fork_prepare for how long it
 *    waits); the parent handler says FORK_DONE. The child's helper then
 *    makes a uffd of its own (device, IOC_NEW, UFFDIO_API) and says HELLO
 *    HELPER|AUTO_MAPS as a new client; its beacon is not used.
 *
 *  - Core dumps: reclaimed pages are holes in a core file. Where a fatal
 *    signal's disposition is SIG_DFL at start and a core could be written
 *    (RLIMIT_CORE > 0, or a core_pattern pipe), the agent installs a handler
 *    for the core-dumping signals that (with raw, async-signal-safe calls)
 *    sends RESTORE on a new connection, waits at most 30 s for the answer
 *    (the server brings every page back and stops managing the process),
 *    then restores SIG_DFL and re-raises with tgkill, so the kernel writes
 *    the core with every page present. An ERROR (an older server) or no
 *    server still dumps.
 *
 *  - How to zap is asked of the kernel once, at start, on a scratch page
 *    that the server never sees (it is gone before HELLO): the PIDFD_SELF
 *    pseudo-fd is recent (EBADF before), and before 6.13 process_madvise
 *    refuses MADV_DONTNEED whoever the target (EINVAL: only COLD, PAGEOUT,
 *    WILLNEED and COLLAPSE), as on Debian 12's 6.1. So: process_madvise
 *    (PIDFD_SELF), else through a pidfd of the program, else one madvise()
 *    per range. The ranges the server sends are already merged, so the
 *    fallback drops the same pages with as few calls as it can; what it
 *    loses is the shared TLB flush. UFFDSRV_AGENT_ZAP=madvise|pidfd forces a
 *    fallback, for tests only. If the chosen call later fails as an unknown
 *    one would, the next one down is tried and remembered. A partial result
 *    means the kernel stopped at a failing range: we call again from there
 *    so that the failure itself reports its errno, and then stop. Skipping
 *    the failed range would tell the server that pages it still counts as
 *    resident were dropped, or the other way round.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "uffdsrv.h"
#include "uffdsrv_proto.h"

#if !defined(__x86_64__)
#error "the agent's helper makes raw x86-64 system calls; port raw_syscall6 and the fake TCB"
#endif

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
#ifndef SYS_kcmp
#define SYS_kcmp 312
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

#define AGENT_NOFORK_FEATURES (AGENT_API_FEATURES & ~(uint64_t)UFFD_FEATURE_EVENT_FORK)
#define NO_FORK_EVENTS(st) (!((st)->features & UFFD_FEATURE_EVENT_FORK))

enum { GATE_OPEN, GATE_ZAPPING, GATE_HELD };

#define REPLY_TIMEOUT_MS 10000
#define FORK_WAIT_MS 1000           /* FORK_PREPARE asked again after an ERROR or no server */
#define DEVICE_TRIES 30             /* a fork child's helper asks this often for the device */
#define RESTORE_TIMEOUT_MS 30000
#define WATCH_MS 1000                /* the helper looks at its program at least this often */
#define REGION_BYTES (384 * 1024)   /* helper stack + state */
#define PAGE_SZ 4096UL
#define TLS_PAD 16384               /* below the fake TCB: static TLS reads land here */

enum pm_mode { PM_UNKNOWN, PM_SELF, PM_PIDFD, PM_MADVISE };

/* Everything the helper touches. It lives at the top of the private
 * region, above the helper's stack (which grows down towards a guard). */
struct agent {
    int uffd;        /* our own uffd, or -1 (forked child before HELLO_OK) */
    int sock;        /* control connection, -1 while reconnecting */
    int pidfd;       /* the program's pidfd: exit watch and PM_PIDFD target */
    int forked;      /* this process is a fork child of a managed one */
    int hello_done;  /* the helper's first HELLO (a fork child's) went through */
    int fork_sock;   /* FORK_PREPARE's connection across fork(), or -1 (program side) */
    _Atomic int zap_gate;          /* GATE_OPEN, GATE_ZAPPING (helper), GATE_HELD (fork) */
    _Atomic uint64_t zaps_seen;    /* zaps that dropped pages (the helper counts) */
    uint64_t zaps_clean;           /* zaps_seen when every page was last known back */
    unsigned flags;  /* HELLO flags chosen at start (AUTO_MAPS) */
    int pm_mode;
    int program;     /* the program's pid (the helper's parent) */
    unsigned uid;    /* the program's real uid at start: whom we trust */
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
    unsigned char tls_pad[TLS_PAD];
    _Alignas(64) uintptr_t tcb[32]; /* the helper's TLS: self pointers, canary */
};

/* Touched only by threads of the program (start, register, atfork, the
 * crash handler), never by the helper. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct agent *g_st;
static atomic_int g_managed;
static int g_atfork_done;
static atomic_uint_fast64_t g_api_seq = 1;
static char g_status[256] = "not started";

/* ------------------------------------------------------------------ */
/* raw system calls: no errno, no TLS, no locks                        */

static inline long raw_syscall6(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

#define RS(n, a, b, c, d, e, f) raw_syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), \
                                            (long)(e), (long)(f))

static long r_close(int fd) { return RS(SYS_close, fd, 0, 0, 0, 0, 0); }
static int r_getpid(void) { return (int)RS(SYS_getpid, 0, 0, 0, 0, 0, 0); }
static int r_getppid(void) { return (int)RS(SYS_getppid, 0, 0, 0, 0, 0, 0); }
static int r_gettid(void) { return (int)RS(SYS_gettid, 0, 0, 0, 0, 0, 0); }

__attribute__((noreturn)) static void r_exit(int code) {
    for (;;) RS(SYS_exit, code, 0, 0, 0, 0, 0);
}

static void r_sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (RS(SYS_nanosleep, &ts, &ts, 0, 0, 0, 0) == -EINTR) {
    }
}

/* Milliseconds on CLOCK_MONOTONIC, through the syscall (the vDSO's data
 * page is fine, but its lookup goes through glibc). */
static long r_now_ms(void) {
    struct timespec ts;
    if (RS(SYS_clock_gettime, CLOCK_MONOTONIC, &ts, 0, 0, 0, 0) < 0) return 0;
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static long r_poll(struct pollfd *p, unsigned n, long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    return RS(SYS_ppoll, p, n, ms < 0 ? NULL : &ts, NULL, 0, 0);
}

static long r_madvise(void *addr, size_t len, int advice) {
    return RS(SYS_madvise, addr, len, advice, 0, 0, 0);
}

static long r_pmadvise(int pidfd, const struct iovec *iov, size_t n) {
    return RS(SYS_process_madvise, pidfd, iov, n, MADV_DONTNEED, 0, 0);
}

static int r_pidfd_open(int pid) { return (int)RS(SYS_pidfd_open, pid, 0, 0, 0, 0, 0); }

/* Does the helper still share its parent's mm? -ENOSYS without kcmp. */
static long same_vm_as_parent(void) {
    return RS(SYS_kcmp, r_getpid(), r_getppid(), KCMP_VM, 0, 0, 0);
}

/* ------------------------------------------------------------------ */
/* small helpers, all malloc-free                                      */

/* Only the constructor's one line, and only while fd 2 is open. */
static void say_unmanaged(const char *reason) {
    if (fcntl(2, F_GETFD) < 0) return;
    char line[320];
    int n = snprintf(line, sizeof line, "uffdsrv-agent: %s; running unmanaged\n", reason);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

/* A reason for the caller's one line. The helper passes why == NULL, and
 * then not even the arguments are evaluated: strerror() reads the locale
 * from TLS, snprintf takes stdio's locks. */
#define WHY(...)                                        \
    do {                                                \
        if (why) snprintf(why, whylen, __VA_ARGS__);    \
    } while (0)

static void hdr_init(struct ufs_hdr *h, uint16_t type, uint64_t seq) {
    h->magic = UFS_MAGIC;
    h->version = UFS_VERSION;
    h->type = type;
    h->seq = seq;
}

/* recvmsg that never leaks passed fds: the first one is handed to the
 * caller if it asks, the rest are closed. Returns bytes or -errno. */
static long recv_msg(int s, void *buf, size_t len, int flags, int *trunc, int *fd_out) {
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 8)];
    } cbuf;
    struct iovec iov = {buf, len};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.buf;
    mh.msg_controllen = sizeof cbuf.buf;
    if (fd_out) *fd_out = -1;
    long n = RS(SYS_recvmsg, s, &mh, flags | MSG_CMSG_CLOEXEC, 0, 0, 0);
    if (n < 0) return n;
    *trunc = (mh.msg_flags & MSG_TRUNC) != 0;
    /* walk the control data by hand: CMSG_NXTHDR may be a libc call */
    size_t off = 0;
    while (off + sizeof(struct cmsghdr) <= mh.msg_controllen) {
        struct cmsghdr *c = (struct cmsghdr *)(cbuf.buf + off);
        if (c->cmsg_len < sizeof(struct cmsghdr) || off + c->cmsg_len > mh.msg_controllen) break;
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < nfd; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (fd_out && *fd_out < 0)
                    *fd_out = fd;
                else
                    r_close(fd);
            }
        }
        off += CMSG_ALIGN(c->cmsg_len);
    }
    return n;
}

/* Wait until s is readable: 1, 0 on timeout, -1 if the program is gone
 * (only when a pidfd is being watched). */
static int wait_readable(const struct agent *st, int s, long ms, int watch) {
    long end = r_now_ms() + ms;
    for (;;) {
        struct pollfd p[2] = {{s, POLLIN, 0}, {watch ? st->pidfd : -1, POLLIN, 0}};
        long left = end - r_now_ms();
        if (left < 0) left = 0;
        long r = r_poll(p, 2, left);
        if (r == -EINTR) continue;
        if (r < 0) return 0;
        if (p[1].revents) return -1;
        if (p[0].revents) return 1;
        if (left == 0) return 0;
    }
}

/* Connect to the server and check who listens: root or the program's own
 * uid. Returns the socket or -errno (-EPERM: an untrusted listener). */
static int connect_server(const struct agent *st, unsigned *peer_uid) {
    int s = (int)RS(SYS_socket, AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, 0, 0, 0);
    if (s < 0) return s;
    long r;
    do {
        r = RS(SYS_connect, s, &st->addr, st->addrlen, 0, 0, 0);
    } while (r == -EINTR);
    if (r < 0) {
        r_close(s);
        return (int)r;
    }
    struct ucred cred;
    socklen_t len = sizeof cred;
    r = RS(SYS_getsockopt, s, SOL_SOCKET, SO_PEERCRED, &cred, &len, 0);
    if (r < 0 || (cred.uid != 0 && cred.uid != st->uid)) {
        if (peer_uid) *peer_uid = r < 0 ? (unsigned)-1 : cred.uid;
        r_close(s);
        return -EPERM;
    }
    return s;
}

enum hello_result {
    HELLO_DONE = 0,
    HELLO_NOCONN = 1,
    HELLO_REFUSED = 2,
    HELLO_BROKEN = 3,
    HELLO_UNTRUSTED = 4,
    HELLO_GONE = 5, /* the program ended while we waited (helper only) */
};

/* Connect, send HELLO (attaching fd_to_send if >= 0), wait for HELLO_OK.
 * On HELLO_DONE *sock_out is the connection and *fd_in is an fd the server
 * passed back with HELLO_OK (or -1). `why` (NULL in the helper) gets a
 * reason for the caller's one line. Raw calls only, so the helper can use
 * it; `watch` makes the wait end early if the program ends. */
static int hello_exchange(struct agent *st, uint32_t flags, int fd_to_send, int *sock_out,
                          int *fd_in, int watch, char *why, size_t whylen) {
    *fd_in = -1;
    unsigned peer_uid = 0;
    int s = connect_server(st, &peer_uid);
    if (s == -EPERM) {
        WHY("the server at %s runs as uid %d, not root or uid %u",
                st->addr.sun_path, (int)peer_uid, st->uid);
        return HELLO_UNTRUSTED;
    }
    if (s < 0) {
        WHY("cannot connect to %s: %s", st->addr.sun_path, strerror(-s));
        return HELLO_NOCONN;
    }

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
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (fd_to_send >= 0) {
        memset(&cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = sizeof cbuf.buf;
        struct cmsghdr *c = (struct cmsghdr *)cbuf.buf;
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd_to_send, sizeof(int));
    }
    long w;
    do {
        w = RS(SYS_sendmsg, s, &mh, MSG_NOSIGNAL, 0, 0, 0);
    } while (w == -EINTR);
    if (w != (long)sizeof h) {
        WHY("cannot send HELLO: %s", strerror(w < 0 ? (int)-w : EIO));
        r_close(s);
        return HELLO_BROKEN;
    }

    union {
        struct ufs_hdr hdr;
        struct ufs_hello_ok ok;
        struct ufs_error err;
        char raw[512];
    } r;
    int trunc = 0, fd = -1;
    int ready = wait_readable(st, s, REPLY_TIMEOUT_MS, watch);
    if (ready <= 0) {
        WHY("no HELLO_OK from server within %d s", REPLY_TIMEOUT_MS / 1000);
        r_close(s);
        return ready < 0 ? HELLO_GONE : HELLO_BROKEN;
    }
    long n;
    do {
        n = recv_msg(s, &r, sizeof r, MSG_DONTWAIT, &trunc, &fd);
    } while (n == -EINTR);
    if (n <= 0) {
        if (n == 0)
            WHY("server closed the connection during HELLO");
        else
            WHY("HELLO failed: %s", strerror((int)-n));
        r_close(s);
        return HELLO_BROKEN;
    }
    if ((size_t)n < sizeof r.hdr || r.hdr.magic != UFS_MAGIC || r.hdr.version != UFS_VERSION) {
        WHY("bad reply to HELLO (not uffdsrv protocol v%d)", UFS_VERSION);
        if (fd >= 0) r_close(fd);
        r_close(s);
        return HELLO_BROKEN;
    }
    if (r.hdr.type == UFS_HELLO_OK && (size_t)n >= sizeof r.ok && !trunc) {
        *sock_out = s;
        *fd_in = fd;
        return HELLO_DONE;
    }
    if (fd >= 0) r_close(fd);
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
            WHY("server refused HELLO: %s (%s)", tl ? text : "no reason given",
                    strerror(r.err.error > 0 ? r.err.error : EPROTO));
        }
        r_close(s);
        return HELLO_REFUSED;
    }
    WHY("unexpected reply type %u to HELLO", r.hdr.type);
    r_close(s);
    return HELLO_BROKEN;
}

/* ------------------------------------------------------------------ */
/* the uffd: our own device, or the server's                           */

/* Ask the server for its open /dev/userfaultfd (DEVICE, answered OK with
 * the fd). Raw calls only: a fork child's helper asks too. Returns the fd
 * or -errno (-ECONNREFUSED and the like: no server; -EPERM: an untrusted
 * listener or a server that refused). */
static int device_from_server(const struct agent *st) {
    int s = connect_server(st, NULL);
    if (s < 0) return s;
    struct ufs_hdr h;
    hdr_init(&h, UFS_DEVICE, 1);
    long w;
    do {
        w = RS(SYS_sendto, s, &h, sizeof h, MSG_NOSIGNAL, NULL, 0);
    } while (w == -EINTR);
    int ret = -EPROTO;
    if (w != (long)sizeof h) {
        ret = w < 0 ? (int)w : -EIO;
    } else if (wait_readable(st, s, REPLY_TIMEOUT_MS, 0) <= 0) {
        ret = -ETIMEDOUT;
    } else {
        union {
            struct ufs_hdr hdr;
            struct ufs_error err;
            char raw[512];
        } r;
        int trunc = 0, fd = -1;
        long n;
        do {
            n = recv_msg(s, &r, sizeof r, MSG_DONTWAIT, &trunc, &fd);
        } while (n == -EINTR);
        struct stat sb;
        if (n < (long)sizeof r.hdr || r.hdr.magic != UFS_MAGIC || r.hdr.version != UFS_VERSION) {
            ret = n < 0 ? (int)n : -EPROTO;
        } else if (r.hdr.type == UFS_ERROR) {
            ret = (size_t)n >= sizeof r.err && r.err.error > 0 ? -r.err.error : -EPERM;
        } else if (r.hdr.type == UFS_OK && fd >= 0 && RS(SYS_fstat, fd, &sb, 0, 0, 0, 0) == 0 &&
                   S_ISCHR(sb.st_mode)) {
            ret = fd; /* a character device: USERFAULTFD_IOC_NEW tells the rest */
            fd = -1;
        }
        if (fd >= 0) r_close(fd);
    }
    r_close(s);
    return ret;
}

/* A uffd for our own mm, through UFFDIO_API. The device, opened by us or
 * (EACCES/EPERM: it is 0600 root) handed over by the server; its
 * permission was checked at that open, and USERFAULTFD_IOC_NEW makes a
 * uffd for the caller's mm. The userfaultfd() syscall is the last resort
 * only: an unprivileged caller gets at most UFFD_USER_MODE_ONLY, under
 * which the kernel's own faults on our ranges fail with EFAULT. Fork
 * events need CAP_SYS_PTRACE (UFFDIO_API answers EPERM before it sets
 * anything): then the same uffd is asked for the rest, and forks are kept
 * right by FORK_PREPARE instead. Raw calls; `why` is NULL in the helper. */
static int make_uffd(const struct agent *st, uint64_t *features, char *why, size_t whylen) {
    int dev = (int)RS(SYS_open, "/dev/userfaultfd", O_RDWR | O_CLOEXEC, 0, 0, 0, 0);
    int from_server = 0;
    if (dev == -EACCES || dev == -EPERM) {
        int d = device_from_server(st);
        if (d < 0) {
            WHY("cannot open /dev/userfaultfd (%s), and the server did not hand it over: %s",
                strerror(-dev), strerror(-d));
            return d;
        }
        dev = d;
        from_server = 1;
    }
    long fd;
    if (dev >= 0) {
        fd = RS(SYS_ioctl, dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK, 0, 0, 0);
        r_close(dev);
        if (fd < 0 && from_server) {
            WHY("USERFAULTFD_IOC_NEW on the server's /dev/userfaultfd: %s", strerror((int)-fd));
            return (int)fd;
        }
    } else {
        fd = -1;
    }
    if (fd < 0) fd = RS(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK, 0, 0, 0, 0, 0);
    if (fd < 0) {
        WHY("cannot create userfaultfd: %s", strerror((int)-fd));
        return (int)fd;
    }
    uint64_t wanted = AGENT_API_FEATURES;
    struct uffdio_api api = {.api = UFFD_API, .features = wanted};
    long r = RS(SYS_ioctl, fd, UFFDIO_API, &api, 0, 0, 0);
    if (r == -EPERM) {
        wanted = AGENT_NOFORK_FEATURES;
        memset(&api, 0, sizeof api);
        api.api = UFFD_API;
        api.features = wanted;
        r = RS(SYS_ioctl, fd, UFFDIO_API, &api, 0, 0, 0);
    }
    if (r < 0) {
        WHY("UFFDIO_API with remap/remove/unmap/thread-id events: %s", strerror((int)-r));
        r_close((int)fd);
        return (int)r;
    }
    /* The kernel answers with every feature it has; ours are those asked. */
    *features = api.features & wanted;
    return (int)fd;
}

/* ------------------------------------------------------------------ */
/* zapping (the helper; the probe at start uses the same calls)        */

/* process_madvise's contract with madvise(): bytes done up to the first
 * failing range, or -errno when the first one fails. */
static long madvise_each(const struct iovec *iov, size_t n) {
    long total = 0;
    for (size_t i = 0; i < n; i++) {
        if (iov[i].iov_len) {
            long r = r_madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED);
            if (r < 0) return total ? total : r;
        }
        total += (long)iov[i].iov_len;
    }
    return total;
}

static long pm_call(struct agent *st, struct iovec *iov, size_t n) {
    if (st->pm_mode == PM_MADVISE) return madvise_each(iov, n);
    if (st->pm_mode == PM_PIDFD) {
        long r = r_pmadvise(st->pidfd, iov, n);
        if (r >= 0 || (r != -EINVAL && r != -ENOSYS)) return r;
        /* DONTNEED refused by process_madvise (before 6.13): fall back,
         * unless the ranges themselves are what madvise refuses too. */
        long r2 = madvise_each(iov, n);
        if (r2 >= 0) st->pm_mode = PM_MADVISE;
        return r2 >= 0 ? r2 : r;
    }
    long r = r_pmadvise(PIDFD_SELF, iov, n);
    if (r >= 0) {
        st->pm_mode = PM_SELF;
        return r;
    }
    if (st->pm_mode == PM_SELF || (r != -EBADF && r != -EINVAL && r != -ESRCH)) return r;
    /* PIDFD_SELF may be unknown to this kernel: try the program's pidfd. */
    if (st->pidfd < 0) return r;
    long r2 = r_pmadvise(st->pidfd, iov, n);
    if (r2 >= 0) {
        st->pm_mode = PM_PIDFD;
        return r2;
    }
    /* Both failed: the error is about the ranges, not the pseudo-fd. If
     * the errors differ, PIDFD_SELF itself was the problem, and EINVAL
     * through a real pidfd is a kernel that refuses DONTNEED there. */
    if (r2 != r) {
        st->pm_mode = PM_PIDFD;
        if (r2 == -EINVAL) return pm_call(st, iov, n);
    }
    return r2;
}

/* The zap call this kernel takes (see the top of the file), tried on a
 * touched scratch page that must read as zeros afterwards. Runs at start,
 * on the program's thread, with st->pidfd already open; the page is
 * unmapped before HELLO. */
static int probe_zap_mode(struct agent *st) {
    const char *force = secure_getenv("UFFDSRV_AGENT_ZAP"); /* tests only */
    if (force && strcmp(force, "madvise") == 0) return PM_MADVISE;
    volatile char *p = mmap(NULL, PAGE_SZ, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return PM_UNKNOWN;
    struct iovec iov = {(void *)p, PAGE_SZ};
    int mode = PM_MADVISE;
    p[0] = 1;
    if (!(force && strcmp(force, "pidfd") == 0) && r_pmadvise(PIDFD_SELF, &iov, 1) == (long)PAGE_SZ &&
        p[0] == 0) {
        mode = PM_SELF;
    } else {
        p[0] = 1;
        if (st->pidfd >= 0 && r_pmadvise(st->pidfd, &iov, 1) == (long)PAGE_SZ && p[0] == 0)
            mode = PM_PIDFD;
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
    int err = 0, gated = 0;
    uint32_t count = z->count;
    if (trunc || n < sizeof *z || count < 1 || count > UFS_MAX_ZAP_RANGES ||
        n != sizeof *z + (size_t)count * sizeof(struct ufs_range) || (z->flags & ~UFS_ZAP_MADVISE)) {
        err = EINVAL;
        goto reply;
    }
    for (uint32_t i = 0; i < count; i++) {
        /* Zapping our own stack or buffers would be fatal to the helper. */
        if (range_overlaps_private(st, z->ranges[i].start, z->ranges[i].len)) {
            err = EPERM;
            goto reply;
        }
    }
    /* A fork is being prepared (atfork_prepare holds the gate): a page
     * dropped now would be zeros in the child. Nothing is zapped, and the
     * server gives the batch's pages back. */
    int open_ = GATE_OPEN;
    if (!atomic_compare_exchange_strong(&st->zap_gate, &open_, GATE_ZAPPING)) {
        err = EAGAIN;
        goto reply;
    }
    gated = 1;
    /* A zap can wait in the kernel for as long as nobody reads its REMOVE
     * (the server stopped and left the program registered for the next
     * one), and only a fatal signal ends that wait. If the program dies
     * meanwhile, nothing in user space would end us, and we would keep its
     * whole mm alive: so for the zap only, the program's death kills us.
     * (The death signal follows the thread that cloned us: a main thread
     * that pthread_exit()s during a zap ends the helper too; the server
     * still holds the uffd, and the batch waits for an agent.) */
    RS(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0, 0);
    if (r_getppid() != st->program) { /* it died before the line above */
        err = ESRCH;
        goto reply;
    }

    if (z->flags & UFS_ZAP_MADVISE) {
        for (uint32_t i = 0; i < count; i++) {
            long r = r_madvise((void *)(uintptr_t)z->ranges[i].start, z->ranges[i].len,
                               MADV_DONTNEED);
            if (r < 0) {
                err = (int)-r;
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
            if (r == -EINTR && ++tries < 100) continue;
            err = (int)-r;
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
    if (gated) {
        RS(SYS_prctl, PR_SET_PDEATHSIG, 0, 0, 0, 0, 0);
        if (total) atomic_fetch_add(&st->zaps_seen, 1);
        atomic_store(&st->zap_gate, GATE_OPEN);
    }
    d.result = total ? (int64_t)total : (err ? -(int64_t)err : 0);
    d.ranges_done = done;
    d.error = err;
    if (st->sock >= 0) RS(SYS_sendto, st->sock, &d, sizeof d, MSG_NOSIGNAL, NULL, 0);
}

/* ------------------------------------------------------------------ */
/* the helper                                                          */

/* Is the program still the one we serve? Its thread group has not ended,
 * it is still our parent, and it still has the mm we share (an exec gives
 * it a new one). */
static int program_alive(const struct agent *st) {
    if (r_getppid() != st->program) return 0;
    /* Only a definite "another mm" ends us. EPERM (a program that made
     * itself non-dumpable, or exec'd a setuid file) or ENOSYS (no kcmp)
     * cannot tell, and leaving while the program may still have
     * reclaimed pages would drop the uffd copy that keeps them safe. */
    long r = same_vm_as_parent();
    return r <= 0;
}

/* Parse "Name:\tN\tN..." out of a /proc status text: up to max numbers. */
static int status_ids(const char *text, const char *name, unsigned *out, int max) {
    size_t nl = strlen(name);
    for (const char *p = text; *p;) {
        if (strncmp(p, name, nl) == 0) {
            int n = 0;
            p += nl;
            while (n < max) {
                while (*p == ' ' || *p == '\t') p++;
                if (*p < '0' || *p > '9') break;
                unsigned v = 0;
                while (*p >= '0' && *p <= '9') v = v * 10 + (unsigned)(*p++ - '0');
                out[n++] = v;
            }
            return n;
        }
        while (*p && *p != '\n') p++;
        if (*p) p++;
    }
    return -1;
}

/* Credentials are per task, and glibc's setuid() broadcast reaches only
 * its own threads: a program that drops root would leave a root helper
 * sharing its memory. So the helper follows the program's ids down (uids,
 * gids, groups), checked on every wake-up. Raw calls change only the
 * helper itself, which is what we want here. */
static void follow_ids(struct agent *st) {
    char path[32] = "/proc/";
    char *q = path + 6;
    char digits[12];
    int nd = 0;
    for (unsigned v = (unsigned)st->program; v && nd < 11; v /= 10) digits[nd++] = (char)('0' + v % 10);
    while (nd) *q++ = digits[--nd];
    memcpy(q, "/status", 8);
    int fd = (int)RS(SYS_open, path, O_RDONLY | O_CLOEXEC, 0, 0, 0, 0);
    if (fd < 0) return;
    char *text = (char *)st->rbuf; /* free between messages */
    long n = RS(SYS_read, fd, text, sizeof st->rbuf - 1, 0, 0, 0);
    r_close(fd);
    if (n <= 0) return;
    text[n] = 0;
    unsigned uid[4], gid[4], groups[64], ru, eu, su, rg, eg, sg;
    int ng = status_ids(text, "Groups:", groups, 64);
    if (status_ids(text, "Uid:", uid, 4) < 3 || status_ids(text, "Gid:", gid, 4) < 3 || ng < 0)
        return;
    RS(SYS_getresuid, &ru, &eu, &su, 0, 0, 0);
    RS(SYS_getresgid, &rg, &eg, &sg, 0, 0, 0);
    if (ru == uid[0] && eu == uid[1] && su == uid[2] && rg == gid[0] && eg == gid[1] &&
        sg == gid[2])
        return;
    /* groups and gids first: after the uids change we may not be allowed */
    RS(SYS_setgroups, ng, groups, 0, 0, 0, 0);
    RS(SYS_setresgid, gid[0], gid[1], gid[2], 0, 0, 0);
    RS(SYS_setresuid, uid[0], uid[1], uid[2], 0, 0, 0);
}

static __attribute__((noreturn)) void helper_exit(struct agent *st) {
    /* The uffd goes with us; by now the program is gone or has a new mm,
     * so nothing is registered through it any more. */
    if (st->sock >= 0) r_close(st->sock);
    r_exit(0);
}

/* Sleep up to ms, waking early if the program ends: 0, or -1 if it did. */
static int nap(const struct agent *st, long ms) {
    if (st->pidfd < 0) {
        r_sleep_ms(ms);
        return program_alive(st) ? 0 : -1;
    }
    struct pollfd p = {st->pidfd, POLLIN, 0};
    long r;
    do {
        r = r_poll(&p, 1, ms);
    } while (r == -EINTR);
    return (r > 0 || !program_alive(st)) ? -1 : 0;
}

/* The server is gone (or this is a fork child's first HELLO): hand our
 * uffd to the next one. Returns when a connection has said HELLO_OK;
 * exits the helper if the program ends meanwhile. */
static void connect_helper(struct agent *st) {
    long delay = st->hello_done ? 100 : 0;
    int tries = 0;
    for (;;) {
        if (delay && nap(st, delay) < 0) helper_exit(st);
        if (!program_alive(st)) helper_exit(st);
        follow_ids(st);
        delay = 100;
        if (st->uffd < 0 && NO_FORK_EVENTS(st)) {
            /* A fork child without fork events has no uffd from the kernel:
             * it makes its own and says HELLO as a new client. Until then
             * nothing of it is registered, so giving up leaves it whole,
             * unmanaged. */
            uint64_t features = 0;
            int fd = make_uffd(st, &features, NULL, 0);
            if (fd < 0) {
                if (++tries >= DEVICE_TRIES) helper_exit(st);
                delay = 1000;
                continue;
            }
            st->uffd = fd;
            st->features = features;
        }
        uint32_t flags = st->flags | UFS_HELLO_HELPER;
        if (st->hello_done) flags |= UFS_HELLO_RECONNECT;
        if (st->uffd < 0) flags |= UFS_HELLO_FORKED;
        int s = -1, fd_in = -1;
        int r = hello_exchange(st, flags, st->uffd, &s, &fd_in, 1, NULL, 0);
        if (r == HELLO_GONE) helper_exit(st);
        if (r == HELLO_DONE) {
            if (fd_in >= 0) {
                if (st->uffd < 0)
                    st->uffd = fd_in;
                else
                    r_close(fd_in);
            }
            st->sock = s;
            st->hello_done = 1;
            return;
        }
        /* A fork child the server does not know (it missed the beacon)
         * has nothing to come back for: the server holds its uffd. */
        if (r == HELLO_REFUSED && st->uffd < 0 && !st->hello_done) helper_exit(st);
        if (r == HELLO_REFUSED || r == HELLO_UNTRUSTED) delay = 1000;
    }
}

static int helper_main(void *arg) {
    struct agent *st = arg;
    uint64_t all = ~0ULL;
    RS(SYS_rt_sigprocmask, SIG_SETMASK, &all, NULL, sizeof all, 0, 0);
    RS(SYS_prctl, PR_SET_NAME, "uffdsrv-zap", 0, 0, 0, 0);
    if (st->forked && !NO_FORK_EVENTS(st)) {
        /* Empty the beacon again for the child's own children. The REMOVE
         * this raises waits until the server reads it: here, not in fork(). */
        r_madvise((void *)st->beacon, PAGE_SZ, MADV_DONTNEED);
    }
    for (;;) {
        if (st->sock < 0) connect_helper(st);
        struct pollfd p[2] = {{st->sock, POLLIN, 0}, {st->pidfd, POLLIN, 0}};
        long r = r_poll(p, 2, WATCH_MS);
        if (p[1].revents || !program_alive(st)) helper_exit(st);
        follow_ids(st);
        if (r <= 0) continue;
        if (!p[0].revents) continue;
        int trunc = 0;
        long n = recv_msg(st->sock, st->rbuf, sizeof st->rbuf, MSG_DONTWAIT, &trunc, NULL);
        if (n == -EINTR || n == -EAGAIN) continue;
        if (n <= 0) {
            r_close(st->sock);
            st->sock = -1;
            continue;
        }
        const struct ufs_hdr *h = (const struct ufs_hdr *)st->rbuf;
        if ((size_t)n < sizeof *h || h->magic != UFS_MAGIC || h->version != UFS_VERSION) continue;
        if (h->type == UFS_ZAP) handle_zap(st, (size_t)n, trunc);
        /* other types: ignored (forward compatibility) */
    }
    return 0;
}

/* Clone the helper: the program's mm, a copy of its fd table, nothing else.
 * Returns its pid or -errno. Runs on a program thread. */
static int spawn_helper(struct agent *st) {
    /* The helper's TLS is a fake TCB of its own (see the top): %fs:0 and
     * %fs:0x10 point at it, as glibc's do, and the canary slot holds the
     * cloning thread's canary. */
    memset(st->tcb, 0, sizeof st->tcb);
    st->tcb[0] = (uintptr_t)st->tcb;
    st->tcb[2] = (uintptr_t)st->tcb;
    uintptr_t guard;
    __asm__("movq %%fs:0x28, %0" : "=r"(guard));
    st->tcb[5] = guard;
    void *top = (void *)(((uintptr_t)st->stack + st->stack_len) & ~(uintptr_t)15);
    /* Born with every signal blocked; the helper then blocks glibc's own
     * ones too, which pthread_sigmask leaves out. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int pid = clone(helper_main, top, CLONE_VM | CLONE_UNTRACED | CLONE_SETTLS, st, NULL,
                    (void *)st->tcb, NULL);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid < 0 ? -e : pid;
}

/* ------------------------------------------------------------------ */
/* fork                                                                */

/* Without fork events (see make_uffd) the child's copy of every
 * registered range is unregistered at fork, and a page we had zapped
 * reads as zeros there. So before fork(), on the forking thread: hold the
 * helper's zaps (the gate: a zap already running finishes first; one that
 * comes meanwhile is answered "not done"), and unless nothing was zapped
 * since every page was last back, ask the server to bring them all back
 * (FORK_PREPARE; it also holds reclaim of us until FORK_DONE). There is
 * no bound after which fork goes on with pages possibly out: they can come
 * back only from a server, so the prepare waits for one, as a fault on
 * such a page would: for the answer while its connection is open (the
 * server answers once the pages are back, or ERROR once the disk failed
 * them for 2 s), asking again every FORK_WAIT_MS after an ERROR or while
 * no server listens. A program that never had a page reclaimed, or had
 * them all back at its last fork, never waits and needs no server. */
static void fork_prepare(struct agent *st) {
    for (int spins = 0;; spins++) {
        int open_ = GATE_OPEN;
        if (atomic_compare_exchange_strong(&st->zap_gate, &open_, GATE_HELD)) break;
        if (spins < 100)
            RS(SYS_sched_yield, 0, 0, 0, 0, 0, 0);
        else
            r_sleep_ms(1);
    }
    uint64_t seen = atomic_load(&st->zaps_seen);
    if (seen == st->zaps_clean) return;
    for (;;) {
        int s = connect_server(st, NULL);
        if (s >= 0) {
            struct ufs_hdr h;
            hdr_init(&h, UFS_FORK_PREPARE, 1);
            if (RS(SYS_sendto, s, &h, sizeof h, MSG_NOSIGNAL, NULL, 0) == (long)sizeof h) {
                int ready;
                while ((ready = wait_readable(st, s, 3600 * 1000L, 0)) == 0) {
                }
                union {
                    struct ufs_hdr hdr;
                    char raw[512];
                } r;
                int trunc = 0;
                long n;
                do {
                    n = recv_msg(s, &r, sizeof r, MSG_DONTWAIT, &trunc, NULL);
                } while (n == -EINTR);
                if (ready > 0 && n >= (long)sizeof r.hdr && r.hdr.magic == UFS_MAGIC &&
                    r.hdr.version == UFS_VERSION && r.hdr.type == UFS_OK) {
                    st->fork_sock = s; /* FORK_DONE goes on it after fork() */
                    st->zaps_clean = seen;
                    return;
                }
            }
            r_close(s);
        }
        r_sleep_ms(FORK_WAIT_MS);
    }
}

/* g_lock is held across fork so a child never inherits it locked by a
 * thread that does not exist there (a start in progress finishes first). */
static void atfork_prepare(void) {
    pthread_mutex_lock(&g_lock);
    struct agent *st = g_st;
    if (st && atomic_load(&g_managed) && NO_FORK_EVENTS(st)) fork_prepare(st);
}

static void atfork_parent(void) {
    struct agent *st = g_st;
    if (st && st->fork_sock >= 0) {
        struct ufs_hdr h;
        hdr_init(&h, UFS_FORK_DONE, 1);
        RS(SYS_sendto, st->fork_sock, &h, sizeof h, MSG_NOSIGNAL | MSG_DONTWAIT, NULL, 0);
        r_close(st->fork_sock);
        st->fork_sock = -1;
    }
    if (st) {
        int held = GATE_HELD;
        atomic_compare_exchange_strong(&st->zap_gate, &held, GATE_OPEN);
    }
    pthread_mutex_unlock(&g_lock);
}

/* The child is single-threaded here and its parent may have been threaded:
 * only raw calls, no stdio, no connect, nothing that waits for the server
 * except the beacon read, which must come from this thread. */
static void atfork_child(void) {
    struct agent *st = g_st;
    pthread_mutex_unlock(&g_lock);
    if (st && st->fork_sock >= 0) { /* the parent's FORK_PREPARE connection */
        r_close(st->fork_sock);
        st->fork_sock = -1;
    }
    if (!st || !atomic_load(&g_managed)) return;
    atomic_store(&g_managed, 0);
    /* Our memory is whole (and a copy: the parent's helper never zaps it),
     * and without fork events we start as a new client. */
    atomic_store(&st->zap_gate, GATE_OPEN);
    st->zaps_clean = atomic_load(&st->zaps_seen);

    /* The fd numbers in st are the parent's helper's: not ours to touch. */
    st->sock = st->uffd = st->pidfd = -1;
    st->forked = 1;
    st->hello_done = 0;
    st->program = r_getpid();

    /* Fault on the empty, registered beacon: the fault lands on the
     * child's new uffd with our thread id, naming us to the server.
     * Without fork events nothing is registered here any more. */
    if (!NO_FORK_EVENTS(st)) (void)*(volatile char *)st->beacon;

    int fd = r_pidfd_open(st->program);
    st->pidfd = fd >= 0 ? fd : -1;
    if (st->pm_mode == PM_PIDFD && st->pidfd < 0) st->pm_mode = PM_UNKNOWN;
    if (spawn_helper(st) > 0) atomic_store(&g_managed, 1);
    /* The child's copy: the helper has its own. */
    if (st->pidfd >= 0) r_close(st->pidfd);
}

/* ------------------------------------------------------------------ */
/* core dumps: every page back first                                   */

static const int g_dump_sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGQUIT, SIGSYS, SIGTRAP};

struct k_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

/* Runs on the crashing thread, possibly with locks of glibc held: raw
 * calls only. A second crash while we wait goes straight to the kernel. */
static void dump_handler(int sig, siginfo_t *si, void *uc) {
    (void)si;
    (void)uc;
    struct agent *st = g_st;
    struct k_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    for (size_t i = 0; i < sizeof g_dump_sigs / sizeof g_dump_sigs[0]; i++)
        RS(SYS_rt_sigaction, g_dump_sigs[i], &dfl, NULL, 8, 0, 0);
    if (st && atomic_load(&g_managed)) {
        int s = connect_server(st, NULL);
        if (s >= 0) {
            struct ufs_hdr h;
            hdr_init(&h, UFS_RESTORE, 1);
            if (RS(SYS_sendto, s, &h, sizeof h, MSG_NOSIGNAL, NULL, 0) == (long)sizeof h &&
                wait_readable(st, s, RESTORE_TIMEOUT_MS, 0) > 0) {
                char buf[256];
                int trunc;
                recv_msg(s, buf, sizeof buf, MSG_DONTWAIT, &trunc, NULL);
            }
            r_close(s);
        }
    }
    RS(SYS_tgkill, r_getpid(), r_gettid(), sig, 0, 0, 0);
}

static int cores_possible(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_CORE, &rl) == 0 && rl.rlim_cur > 0) return 1;
    int fd = open("/proc/sys/kernel/core_pattern", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char c = 0;
    ssize_t n = read(fd, &c, 1);
    close(fd);
    return n == 1 && c == '|';
}

static void install_dump_handlers(void) {
    if (!cores_possible()) return;
    for (size_t i = 0; i < sizeof g_dump_sigs / sizeof g_dump_sigs[0]; i++) {
        struct sigaction old;
        /* only where nobody chose a disposition (a handler, SIG_IGN) */
        if (sigaction(g_dump_sigs[i], NULL, &old) < 0) continue;
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = dump_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigfillset(&sa.sa_mask);
        sigaction(g_dump_sigs[i], &sa, NULL);
    }
}

/* ------------------------------------------------------------------ */
/* start                                                               */

static struct agent *map_private(char *why, size_t whylen) {
    size_t total = 4 * PAGE_SZ + REGION_BYTES;
    char *m = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        WHY("cannot map private area: %s", strerror(errno));
        return NULL;
    }
    char *beacon = m + PAGE_SZ;
    char *region = m + 3 * PAGE_SZ;
    if (mprotect(beacon, PAGE_SZ, PROT_READ | PROT_WRITE) < 0 ||
        mprotect(region, REGION_BYTES, PROT_READ | PROT_WRITE) < 0) {
        WHY("cannot set up private area: %s", strerror(errno));
        munmap(m, total);
        return NULL;
    }
    size_t st_bytes = (sizeof(struct agent) + PAGE_SZ - 1) & ~(PAGE_SZ - 1);
    struct agent *st = (struct agent *)(region + REGION_BYTES - st_bytes);
    memset(st, 0, sizeof *st);
    st->uffd = st->sock = st->pidfd = st->fork_sock = -1;
    st->map_start = (uintptr_t)m;
    st->map_len = total;
    st->beacon = (uintptr_t)beacon;
    st->stack = region;
    st->stack_len = REGION_BYTES - st_bytes;
    return st;
}

/* After an exec the previous image's helper is still our child: alive for
 * up to WATCH_MS until it sees the new mm, then a zombie that nobody reaps
 * (exit signal 0: wait() without __WALL skips it). End and reap it here. */
static void end_old_helpers(void) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)getpid());
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    for (char *p = buf, *end;; p = end) {
        long pid = strtol(p, &end, 10);
        if (end == p || pid <= 0) break;
        char comm[32];
        snprintf(path, sizeof path, "/proc/%ld/comm", pid);
        int cf = open(path, O_RDONLY | O_CLOEXEC);
        if (cf < 0) continue;
        ssize_t m = read(cf, comm, sizeof comm - 1);
        close(cf);
        if (m <= 0) continue;
        comm[m] = 0;
        if (strcmp(comm, "uffdsrv-zap\n") != 0) continue;
        if (syscall(SYS_kcmp, getpid(), (pid_t)pid, KCMP_VM, 0, 0) == 0) continue; /* ours */
        kill((pid_t)pid, SIGKILL);
        for (int i = 0; i < 100; i++) { /* a killed task ends at once; never hang start */
            siginfo_t si;
            memset(&si, 0, sizeof si);
            if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | __WALL) < 0 || si.si_pid) break;
            struct timespec ts = {0, 10 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
}

static void set_status(const char *s) {
    snprintf(g_status, sizeof g_status, "%s", s);
}

static int agent_start_locked(const char *socket_path, unsigned flags, char *why, size_t whylen) {
    if (!socket_path || !*socket_path) {
        WHY("no socket path");
        return -EINVAL;
    }
    if (flags & ~UFFDSRV_AUTO_MAPS) {
        WHY("unknown flags 0x%x", flags);
        return -EINVAL;
    }
    if (atomic_load(&g_managed)) {
        struct agent *st = g_st;
        if (strcmp(st->addr.sun_path, socket_path) == 0 && st->flags == flags) return 0;
        WHY("already started with another socket or flags");
        return -EBUSY;
    }
    size_t plen = strlen(socket_path);
    if (plen >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        WHY("socket path too long");
        return -ENAMETOOLONG;
    }

    struct agent *st = map_private(why, whylen);
    if (!st) return -ENOMEM;
    st->flags = flags;
    st->program = getpid();
    st->uid = getuid();
    st->addr.sun_family = AF_UNIX;
    memcpy(st->addr.sun_path, socket_path, plen + 1);
    st->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
    /* the server may have to hand us the device: st knows where it is */
    uint64_t features = 0;
    int uffd = make_uffd(st, &features, why, whylen);
    if (uffd < 0) {
        munmap((void *)st->map_start, st->map_len); /* st is in there: last */
        return uffd;
    }
    st->uffd = uffd;
    st->features = features;
    int pidfd = r_pidfd_open(st->program);
    st->pidfd = pidfd >= 0 ? pidfd : -1;
    st->pm_mode = probe_zap_mode(st);

    int s = -1, fd_in = -1;
    int r = hello_exchange(st, flags, uffd, &s, &fd_in, 0, why, whylen);
    if (r != HELLO_DONE) {
        /* Before HELLO went out nobody else knows the mapping: drop it.
         * After, a server may have registered its beacon, and munmap would
         * then wait on an UNMAP event that nobody reads: leave it. */
        if (st->pidfd >= 0) close(st->pidfd);
        close(uffd);
        if (r == HELLO_NOCONN || r == HELLO_UNTRUSTED) /* st is in there: last */
            munmap((void *)st->map_start, st->map_len);
        if (r == HELLO_NOCONN) return -ECONNREFUSED;
        if (r == HELLO_UNTRUSTED) return -EACCES;
        return r == HELLO_REFUSED ? -EPERM : -EPROTO;
    }
    if (fd_in >= 0) close(fd_in);
    st->sock = s;
    st->hello_done = 1;

    end_old_helpers();
    int hp = spawn_helper(st);
    /* From here our fds live in the helper's table only (or, if it could
     * not start, the server holds the uffd and we keep ours: see the top). */
    if (hp < 0) {
        WHY("cannot start the zap helper: %s", strerror(-hp));
        close(s);
        st->sock = -1;
        return hp;
    }
    close(s);
    close(uffd);
    if (st->pidfd >= 0) close(st->pidfd);
    g_st = st;
    if (!g_atfork_done) {
        int e = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
        if (e == 0) g_atfork_done = 1;
        /* Without the handler a forked child simply has no helper. */
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

    int s = connect_server(st, NULL);
    if (s < 0) return s;
    struct timeval tv = {REPLY_TIMEOUT_MS / 1000, 0};
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
        if (wait_readable(st, s, REPLY_TIMEOUT_MS, 0) <= 0) {
            ret = -ETIMEDOUT;
            break;
        }
        long n = recv_msg(s, &r, sizeof r, MSG_DONTWAIT, &trunc, NULL);
        if (n == -EINTR || n == -EAGAIN) continue;
        if (n < 0) {
            ret = (int)n;
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
    /* secure_getenv: a setuid or file-capability program ignores it */
    const char *path = secure_getenv("UFFDSRV_SOCKET");
    if (!path || !*path) return;
    int saved = errno;
    unsigned flags = UFFDSRV_AUTO_MAPS;
    const char *am = secure_getenv("UFFDSRV_AUTO_MAPS");
    if (am && strcmp(am, "0") == 0) flags = 0;
    if (uffdsrv_agent_start(path, flags) != 0)
        say_unmanaged(uffdsrv_agent_status());
    else
        install_dump_handlers();
    errno = saved;
}
