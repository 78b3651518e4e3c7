"""cdef for io_uring, reached through Debian's liburing 2.3."""

INCLUDES = ""

CDEF = """
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
int ufs_ring_readv(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                   int n, uint64_t off, uint64_t user_data);
int ufs_ring_writev(struct ufs_ring *r, int fd, const uint64_t *bufs, const uint64_t *lens,
                    int n, uint64_t off, uint64_t user_data);
int ufs_ring_cancel(struct ufs_ring *r, uint64_t target, uint64_t user_data);
int ufs_ring_submit(struct ufs_ring *r);
void ufs_ring_stats(struct ufs_ring *r, uint64_t *submits, uint64_t *entries);
int ufs_ring_pending(struct ufs_ring *r);
int ufs_ring_harvest(struct ufs_ring *r, uint64_t *user_data, int32_t *res, int max);
int ufs_ring_wait(struct ufs_ring *r, unsigned nr);
"""
