/*
 * refhandler: the smallest fault handler that runs outside the faulting
 * thread, as a yardstick for the server's fault path.
 *
 *   refhandler --uffd FD --swap PATH --base ADDR --len BYTES [--direct 0|1]
 *
 * Started by faulter (refreclaim), which created the uffd, registered
 * [ADDR, ADDR+BYTES) MISSING, wrote page i of it at offset i*4096 of PATH
 * and zapped it. The uffd was inherited across exec; it acts on faulter's
 * memory, not ours. The loop is what every out-of-thread handler must do
 * at least: sleep in poll(), read the fault, pread the page from the swap
 * file, UFFDIO_COPY it in (which also wakes the faulting thread). One page
 * per fault, no readahead, no batching of the ioctls. Reads of the uffd
 * take whatever faults are queued (up to 64), as any handler would.
 *
 * The swap file is read with O_DIRECT (--direct 1, the default): a 4 KiB
 * read from a 4 KiB-aligned buffer at a 4 KiB-aligned offset goes to the
 * device every time, as the server's swap reads do. Through the page cache
 * the file would be served from memory (faulter just wrote it) and, for a
 * sequential walk, the kernel's file readahead would fetch 128 KiB per
 * device read on the handler's behalf: neither is what a swap device
 * gives. --direct 0 (a filesystem that refuses O_DIRECT) reads through the
 * page cache with POSIX_FADV_RANDOM, which turns that readahead off;
 * faulter has dropped the file's cached pages before.
 *
 * Exits on SIGTERM (the default action), or when the uffd reports an
 * error or hangup (faulter exited).
 */
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>

static void usage(void) {
    fprintf(stderr,
            "usage: refhandler --uffd FD --swap PATH --base ADDR --len BYTES [--direct 0|1]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int uffd = -1;
    const char *swap = NULL;
    unsigned long base = 0, len = 0;
    int direct = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--uffd"))
            uffd = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--swap"))
            swap = argv[i + 1];
        else if (!strcmp(argv[i], "--base"))
            base = strtoul(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--len"))
            len = strtoul(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--direct"))
            direct = atoi(argv[i + 1]);
        else
            usage();
    }
    if (uffd < 0 || !swap || !base || !len) usage();
    int fd = open(swap, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    if (fd < 0) {
        perror(direct ? "refhandler: open swap O_DIRECT" : "refhandler: open swap");
        return 1;
    }
    if (!direct) posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    /* O_DIRECT wants the buffer, the offset and the length aligned to the
     * device's logical block (512 B or 4 KiB): a page is all three. */
    static char page[PAGE] __attribute__((aligned(4096)));
    struct uffd_msg msgs[64];
    for (;;) {
        struct pollfd p = {uffd, POLLIN, 0};
        int r = poll(&p, 1, -1);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("refhandler: poll");
            return 1;
        }
        if (p.revents & (POLLERR | POLLHUP)) return 0;
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            perror("refhandler: read uffd");
            return 1;
        }
        for (ssize_t k = 0; k < n / (ssize_t)sizeof msgs[0]; k++) {
            if (msgs[k].event != UFFD_EVENT_PAGEFAULT) continue;
            unsigned long addr = (unsigned long)msgs[k].arg.pagefault.address & ~(PAGE - 1);
            if (addr < base || addr >= base + len) continue;
            if (pread(fd, page, PAGE, (off_t)(addr - base)) != (ssize_t)PAGE) {
                perror("refhandler: pread");
                return 1;
            }
            struct uffdio_copy c = {.dst = addr, .src = (unsigned long)page, .len = PAGE};
            while (ioctl(uffd, UFFDIO_COPY, &c) < 0) {
                if (errno == EAGAIN) { /* an event is unread; none are enabled, but */
                    sched_yield();
                    c.copy = 0;
                    continue;
                }
                if (errno == EEXIST) { /* already there: just wake the thread */
                    struct uffdio_range w = {addr, PAGE};
                    ioctl(uffd, UFFDIO_WAKE, &w);
                    break;
                }
                perror("refhandler: UFFDIO_COPY");
                return 1;
            }
        }
    }
}
