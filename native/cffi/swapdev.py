"""cdef for the swap device: preallocation (fallocate), writeback of a range
(sync_file_range), the filesystem's type (fstatfs) and a fincore-style
count of a file's pages in the page cache (mincore over a mapping of it).

Small static wrappers here keep native.h's convention (0 or a count, else
-errno) without a C file of their own. RWF_DONTCACHE (Linux 6.14) is newer
than Debian 12's headers."""

INCLUDES = """
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#ifndef RWF_DONTCACHE
#define RWF_DONTCACHE 0x00000080
#endif
#ifndef RAMFS_MAGIC
#define RAMFS_MAGIC 0x858458f6
#endif

static int ufs_fallocate(int fd, int mode, int64_t off, int64_t len) {
    return fallocate(fd, mode, off, len) ? -errno : 0;
}

static int ufs_sync_file_range(int fd, int64_t off, int64_t len, unsigned flags) {
    return sync_file_range(fd, off, len, flags) ? -errno : 0;
}

static int ufs_fs_type(int fd, int64_t *type) {
    struct statfs s;
    if (fstatfs(fd, &s)) return -errno;
    *type = (int64_t)s.f_type;
    return 0;
}

/* Pages of [off, off + len) that are in the page cache. Maps the range
 * (touching nothing, so nothing is read in) and asks mincore, a GiB at a
 * time so the vector stays small. off must be page-aligned. */
static int64_t ufs_cached_pages(int fd, int64_t off, int64_t len) {
    const int64_t step = (int64_t)1 << 30;
    unsigned char *vec = malloc(step / 4096);
    if (!vec) return -ENOMEM;
    int64_t count = 0;
    for (int64_t pos = off; pos < off + len; pos += step) {
        size_t n = (size_t)(off + len - pos < step ? off + len - pos : step);
        void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, pos);
        if (m == MAP_FAILED) {
            count = -errno;
            break;
        }
        int e = mincore(m, n, vec) ? -errno : 0;
        munmap(m, n);
        if (e) {
            count = e;
            break;
        }
        for (size_t i = 0; i < (n + 4095) / 4096; i++) count += vec[i] & 1;
    }
    free(vec);
    return count;
}
"""

CDEF = """
#define RWF_DONTCACHE ...
#define SYNC_FILE_RANGE_WAIT_BEFORE ...
#define SYNC_FILE_RANGE_WRITE ...
#define SYNC_FILE_RANGE_WAIT_AFTER ...
#define FALLOC_FL_KEEP_SIZE ...
#define TMPFS_MAGIC ...
#define RAMFS_MAGIC ...
int ufs_fallocate(int fd, int mode, int64_t off, int64_t len);
int ufs_sync_file_range(int fd, int64_t off, int64_t len, unsigned flags);
int ufs_fs_type(int fd, int64_t *type);
int64_t ufs_cached_pages(int fd, int64_t off, int64_t len);
"""
