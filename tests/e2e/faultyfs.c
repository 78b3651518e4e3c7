/*
 * faultyfs: a FUSE filesystem with one regular file, /swap, that passes
 * its I/O through to a real file, and fails the I/O a test asks it to fail
 * with EIO, as a dying disk does. The kernel here has no device-mapper
 * (no dm-flakey, no dm-error), NBD or ublk; FUSE is what is left.
 *
 *   faultyfs [--cached] BACKING MOUNTPOINT [-f] [-s] [-o OPTIONS]
 *
 * The failures are set by writing a line to /.ctl:
 *
 *   read OFF LEN [COUNT]   reads of /swap that overlap [OFF, OFF+LEN) fail;
 *   write OFF LEN [COUNT]  so do writes; with COUNT > 0 only the next COUNT
 *                          of them fail, then they work again; with COUNT
 *                          "Nms", they fail for N ms from the first one
 *                          (a hiccup of the disk). OFF or LEN "all" means
 *                          from 0 / to the end of any file.
 *   ok                     nothing fails any more
 *
 * and reading /.ctl tells what has happened so far:
 *
 *   reads R writes W failed_reads FR failed_writes FW rules N
 *
 * A request that overlaps a failing range fails whole, with nothing
 * transferred, as a bio does when its sectors cannot be read. The kernel
 * cuts a large read or write into requests of at most max_read/max_write
 * bytes (1 MiB here: libfuse asks for 256 pages). A synchronous read(2)
 * or write(2) sends them one after another and returns what the requests
 * before the failing one moved (short); an asynchronous one (io_uring on
 * an O_DIRECT file) sends them all at once and fails whole with EIO.
 *
 * Every file is opened direct_io (FOPEN_DIRECT_IO): the kernel keeps no
 * page cache of it, so every read and write of the program reaches us,
 * whatever flags it opened the file with; O_DIRECT opens are accepted.
 * With --cached, /swap goes through the kernel's page cache instead, and
 * an O_DIRECT open is refused with EINVAL, as filesystems without direct
 * I/O do: a program then takes its fallback (FUSE writes through the
 * cache at write(), and a read the cache misses reaches us).
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define SWAP_PATH "/swap"
#define CTL_PATH "/.ctl"
#define MAX_RULES 16

enum kind { K_READ, K_WRITE };

struct rule {
    enum kind kind;
    uint64_t lo, hi; /* bytes [lo, hi) */
    int64_t left;    /* failures still to come; < 0: for ever */
    int64_t ms;      /* > 0: fail for this long from the first failure */
    int64_t until;   /* then: when that is over (ns, CLOCK_MONOTONIC); 0: not begun */
};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int backing = -1;
static int cached;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct rule rules[MAX_RULES];
static int nrules;
static uint64_t nreads, nwrites, failed_reads, failed_writes;

/* Whether a request of `kind` on [off, off+len) fails; counts it. */
static int fails(enum kind kind, uint64_t off, uint64_t len) {
    int bad = 0;
    int64_t now = now_ns();
    pthread_mutex_lock(&mu);
    if (kind == K_READ)
        nreads++;
    else
        nwrites++;
    for (int r = 0; r < nrules && !bad; r++) {
        struct rule *u = &rules[r];
        if (u->kind != kind || u->left == 0 || off >= u->hi || off + len <= u->lo) continue;
        if (u->ms > 0) {
            if (!u->until) u->until = now + u->ms * 1000000;
            if (now >= u->until) {
                u->left = 0; /* the hiccup is over */
                continue;
            }
        }
        bad = 1;
        if (u->left > 0) u->left--;
    }
    if (bad) {
        if (kind == K_READ)
            failed_reads++;
        else
            failed_writes++;
    }
    pthread_mutex_unlock(&mu);
    return bad;
}

static int parse_u64(const char *s, uint64_t all, uint64_t *v) {
    if (!strcmp(s, "all")) {
        *v = all;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 0);
    if (errno || end == s || *end) return -1;
    *v = x;
    return 0;
}

/* One command line; 0 or -EINVAL. */
static int command(const char *line) {
    char verb[16], a[32], b[32], c[32];
    long long count = -1, ms = 0;
    int n = sscanf(line, "%15s %31s %31s %31s", verb, a, b, c);
    if (n == 4) {
        char *end;
        count = strtoll(c, &end, 10);
        if (end == c || count <= 0) return -EINVAL;
        if (!strcmp(end, "ms")) {
            ms = count;
            count = -1;
        } else if (*end) {
            return -EINVAL;
        }
    }
    if (n == 1 && !strcmp(verb, "ok")) {
        pthread_mutex_lock(&mu);
        nrules = 0;
        pthread_mutex_unlock(&mu);
        return 0;
    }
    if (n < 3 || (strcmp(verb, "read") && strcmp(verb, "write"))) return -EINVAL;
    uint64_t off, len;
    if (parse_u64(a, 0, &off) || parse_u64(b, UINT64_MAX, &len) || len == 0) return -EINVAL;
    struct rule u = {.kind = verb[0] == 'r' ? K_READ : K_WRITE, .lo = off,
                     .hi = len > UINT64_MAX - off ? UINT64_MAX : off + len,
                     .left = count > 0 ? count : -1, .ms = ms};
    int err = 0;
    pthread_mutex_lock(&mu);
    if (nrules == MAX_RULES)
        err = -ENOSPC;
    else
        rules[nrules++] = u;
    pthread_mutex_unlock(&mu);
    return err;
}

static void *ff_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    (void)conn;
    cfg->direct_io = !cached; /* no page cache: every I/O is a request to us */
    cfg->kernel_cache = 0;
    cfg->attr_timeout = 0;  /* sizes change under truncate and fallocate */
    cfg->entry_timeout = 0;
    cfg->use_ino = 1;
    return NULL;
}

static int ff_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    (void)fi;
    memset(st, 0, sizeof *st);
    if (!strcmp(path, "/")) {
        st->st_mode = S_IFDIR | 0700;
        st->st_nlink = 2;
        st->st_ino = 1;
        st->st_uid = getuid();
        st->st_gid = getgid();
        return 0;
    }
    if (!strcmp(path, CTL_PATH)) {
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        st->st_ino = 3;
        st->st_uid = getuid();
        st->st_gid = getgid();
        return 0;
    }
    if (strcmp(path, SWAP_PATH)) return -ENOENT;
    if (fstat(backing, st) < 0) return -errno;
    st->st_ino = 2;
    return 0;
}

static int ff_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)off;
    (void)fi;
    (void)flags;
    if (strcmp(path, "/")) return -ENOTDIR;
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    fill(buf, SWAP_PATH + 1, NULL, 0, 0);
    fill(buf, CTL_PATH + 1, NULL, 0, 0);
    return 0;
}

static int known(const char *path) {
    return !strcmp(path, SWAP_PATH) || !strcmp(path, CTL_PATH);
}

static int ff_open(const char *path, struct fuse_file_info *fi) {
    if (!known(path)) return -ENOENT;
    int swap = !strcmp(path, SWAP_PATH);
    if (swap && cached && (fi->flags & O_DIRECT)) return -EINVAL;
    fi->direct_io = !(swap && cached);
    fi->keep_cache = 0;
    return 0;
}

static int ff_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi) {
    (void)fi;
    if (!strcmp(path, CTL_PATH)) {
        char text[256];
        pthread_mutex_lock(&mu);
        int n = snprintf(text, sizeof text,
                         "reads %" PRIu64 " writes %" PRIu64 " failed_reads %" PRIu64
                         " failed_writes %" PRIu64 " rules %d\n",
                         nreads, nwrites, failed_reads, failed_writes, nrules);
        pthread_mutex_unlock(&mu);
        if (off >= n) return 0;
        size_t len = (size_t)n - (size_t)off < size ? (size_t)n - (size_t)off : size;
        memcpy(buf, text + off, len);
        return (int)len;
    }
    if (strcmp(path, SWAP_PATH)) return -ENOENT;
    if (fails(K_READ, (uint64_t)off, size)) return -EIO;
    size_t done = 0;
    while (done < size) {
        ssize_t got = pread(backing, buf + done, size - done, off + (off_t)done);
        if (got < 0) {
            if (errno == EINTR) continue;
            return done ? (int)done : -errno;
        }
        if (got == 0) break;
        done += (size_t)got;
    }
    return (int)done;
}

static int ff_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)fi;
    (void)off;
    if (!strcmp(path, CTL_PATH)) {
        char line[128];
        size_t n = size < sizeof line - 1 ? size : sizeof line - 1;
        memcpy(line, buf, n);
        line[n] = 0;
        for (char *s = line, *nl; s && *s; s = nl) { /* one command a line */
            nl = strchr(s, '\n');
            if (nl) *nl++ = 0;
            if (*s) {
                int err = command(s);
                if (err) return err;
            }
        }
        return (int)size;
    }
    if (strcmp(path, SWAP_PATH)) return -ENOENT;
    if (fails(K_WRITE, (uint64_t)off, size)) return -EIO;
    size_t done = 0;
    while (done < size) {
        ssize_t put = pwrite(backing, buf + done, size - done, off + (off_t)done);
        if (put < 0) {
            if (errno == EINTR) continue;
            return done ? (int)done : -errno;
        }
        done += (size_t)put;
    }
    return (int)done;
}

static int ff_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    (void)fi;
    if (!strcmp(path, CTL_PATH)) return 0; /* open(O_TRUNC) of the control file */
    if (strcmp(path, SWAP_PATH)) return -ENOENT;
    return ftruncate(backing, size) < 0 ? -errno : 0;
}

static int ff_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    (void)fi;
    if (strcmp(path, SWAP_PATH)) return known(path) ? -EPERM : -ENOENT;
    return fchmod(backing, mode & 07777) < 0 ? -errno : 0;
}

static int ff_fallocate(const char *path, int mode, off_t off, off_t len,
                        struct fuse_file_info *fi) {
    (void)fi;
    if (strcmp(path, SWAP_PATH)) return known(path) ? -EOPNOTSUPP : -ENOENT;
    return fallocate(backing, mode, off, len) < 0 ? -errno : 0;
}

static int ff_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)fi;
    if (strcmp(path, SWAP_PATH)) return 0;
    return (datasync ? fdatasync(backing) : fsync(backing)) < 0 ? -errno : 0;
}

static int ff_flush(const char *path, struct fuse_file_info *fi) {
    (void)path;
    (void)fi;
    return 0;
}

static int ff_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    (void)fi;
    return 0;
}

static int ff_statfs(const char *path, struct statvfs *sv) {
    (void)path;
    return fstatvfs(backing, sv) < 0 ? -errno : 0;
}

static int ff_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    (void)fi;
    if (strcmp(path, SWAP_PATH)) return known(path) ? 0 : -ENOENT;
    return futimens(backing, tv) < 0 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .init = ff_init,
    .getattr = ff_getattr,
    .readdir = ff_readdir,
    .open = ff_open,
    .read = ff_read,
    .write = ff_write,
    .truncate = ff_truncate,
    .chmod = ff_chmod,
    .fallocate = ff_fallocate,
    .fsync = ff_fsync,
    .flush = ff_flush,
    .release = ff_release,
    .statfs = ff_statfs,
    .utimens = ff_utimens,
};

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--cached")) {
        cached = 1;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: faultyfs [--cached] BACKING MOUNTPOINT [fuse options]\n");
        return 2;
    }
    backing = open(argv[1], O_RDWR | O_CLOEXEC);
    if (backing < 0) {
        fprintf(stderr, "faultyfs: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    argv[1] = argv[0]; /* fuse_main parses the rest */
    return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
