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
#endif
