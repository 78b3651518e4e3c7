/* userfaultfd ioctls, one call per batch.
 *
 * A fault server resolves faults in bursts: a read of the uffd returns many
 * messages, and readahead resolves runs of pages. Crossing from Python into
 * C once per batch, and issuing contiguous pages as one ioctl, is what keeps
 * the per-fault cost at the kernel's. */
#define _GNU_SOURCE
#include "native.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

int ufs_uffd_open(int flags) {
    /* /dev/userfaultfd hands out uffds that also catch faults taken inside
     * the kernel (copy_to_user into a reclaimed buffer), without the
     * vm.unprivileged_userfaultfd sysctl. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        int err = errno;
        close(dev);
        return fd >= 0 ? fd : -err;
    }
    int fd = syscall(SYS_userfaultfd, flags);
    return fd >= 0 ? fd : -errno;
}

int ufs_uffd_api(int fd, uint64_t features, uint64_t *granted, uint64_t *ioctls) {
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api)) return -errno;
    *granted = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int ufs_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
    struct uffdio_register reg = {.range = {start, len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg)) return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int ufs_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {start, len};
    return ioctl(fd, UFFDIO_UNREGISTER, &r) ? -errno : 0;
}

/* Returns how many entries were attempted. It stops early on EAGAIN (the
 * mm is changing: an event is unread) so the caller can read events and
 * retry the rest; every other error is recorded per entry and the batch
 * goes on. EEXIST (someone filled the page first) still wakes the range. */
int ufs_uffd_copy_batch(int fd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
                        int n, uint64_t mode, int64_t *result) {
    for (int i = 0; i < n; i++) {
        struct uffdio_copy c = {.dst = dst[i], .src = src[i], .len = len[i], .mode = mode};
        if (ioctl(fd, UFFDIO_COPY, &c) == 0) {
            result[i] = c.copy;
            continue;
        }
        int err = errno;
        if ((err == EAGAIN || err == EEXIST) && c.copy > 0) {
            /* a partial copy: report what was done, the caller deals with
             * the rest (EEXIST: the page after those is already there) */
            result[i] = c.copy;
            if (err == EAGAIN) return i + 1;
            continue;
        }
        result[i] = -err;
        if (err == EAGAIN) return i + 1;
        if (err == EEXIST) {
            struct uffdio_range r = {dst[i], len[i]};
            ioctl(fd, UFFDIO_WAKE, &r);
        }
    }
    return n;
}

int ufs_uffd_zeropage_batch(int fd, const uint64_t *dst, const uint64_t *len, int n,
                            int64_t *result) {
    for (int i = 0; i < n; i++) {
        struct uffdio_zeropage z = {.range = {dst[i], len[i]}, .mode = 0};
        if (ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0) {
            result[i] = z.zeropage;
            continue;
        }
        int err = errno;
        if (err == EAGAIN && z.zeropage > 0) {
            result[i] = z.zeropage;
            return i + 1;
        }
        result[i] = -err;
        if (err == EAGAIN) return i + 1;
        if (err == EEXIST) {
            struct uffdio_range r = {dst[i], len[i]};
            ioctl(fd, UFFDIO_WAKE, &r);
        }
    }
    return n;
}

/* Write-protect (mode has UFFDIO_WRITEPROTECT_MODE_WP) or release ranges.
 * Every range is tried; returns 0, or -errno of the first failure. A caller
 * that protected for reclaim must treat any failure as "not protected". */
int ufs_uffd_writeprotect_batch(int fd, const uint64_t *start, const uint64_t *len, int n,
                                uint64_t mode) {
    int first = 0;
    for (int i = 0; i < n; i++) {
        struct uffdio_writeprotect wp = {.range = {start[i], len[i]}, .mode = mode};
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) && !first) first = -errno;
    }
    return first;
}

int ufs_uffd_wake_batch(int fd, const uint64_t *start, const uint64_t *len, int n) {
    int first = 0;
    for (int i = 0; i < n; i++) {
        struct uffdio_range r = {start[i], len[i]};
        if (ioctl(fd, UFFDIO_WAKE, &r) && !first) first = -errno;
    }
    return first;
}
