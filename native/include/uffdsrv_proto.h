/*
 * uffdsrv control protocol, version 1.
 *
 * One SOCK_SEQPACKET connection per agent: every message is one datagram
 * that starts with struct ufs_hdr. All integers are little-endian and
 * naturally aligned (the structs below have no implicit padding), so the
 * Python side reads them with struct.unpack_from and the same layouts.
 *
 * Who sends what:
 *   agent  -> server  HELLO (+ SCM_RIGHTS: the uffd, unless FORKED)
 *   server -> agent   HELLO_OK | ERROR
 *   server -> agent   ZAP            (the agent's zap thread executes it)
 *   agent  -> server  ZAP_DONE       (hdr.seq echoes the ZAP's seq)
 *   api    -> server  REGISTER / UNREGISTER on a second connection of the
 *                     same process (the server finds the client by
 *                     SO_PEERCRED, never by what the message claims)
 *   server -> api     OK | ERROR
 *   cli    -> server  CTL (a JSON request), server -> cli CTL_REPLY (JSON)
 *   agent  -> server  DEVICE, server -> agent OK (+ SCM_RIGHTS: an open
 *                     /dev/userfaultfd), on a connection of its own
 *   agent  -> server  FORK_PREPARE, server -> agent OK | ERROR, then
 *                     agent -> server FORK_DONE, on a connection of its own
 *
 * The server validates every field; a malformed message gets ERROR and the
 * connection is closed.
 */
#ifndef UFFDSRV_PROTO_H
#define UFFDSRV_PROTO_H

#include <stdint.h>

#define UFS_MAGIC 0x31444655u /* "UFD1" */
#define UFS_VERSION 1
#define UFS_MAX_MSG 65536
#define UFS_MAX_ZAP_RANGES 1024 /* UIO_MAXIOV: one process_madvise call */

enum ufs_type {
    UFS_HELLO = 1,
    UFS_HELLO_OK = 2,
    UFS_ZAP = 3,
    UFS_ZAP_DONE = 4,
    UFS_REGISTER = 5,
    UFS_UNREGISTER = 6,
    UFS_OK = 7,
    UFS_ERROR = 8,
    UFS_CTL = 9,
    UFS_CTL_REPLY = 10,
    UFS_RESTORE = 11, /* header only: bring every page of the sender back and
                         stop managing it (before a core dump or a debugger);
                         the server answers OK once the pages are back */
    UFS_DEVICE = 12,  /* header only: an agent that may not open
                         /dev/userfaultfd asks for the server's open one,
                         answered OK + SCM_RIGHTS (the device); the agent
                         makes its uffd with USERFAULTFD_IOC_NEW on it */
    UFS_FORK_PREPARE = 13, /* header only, from an agent without fork events
                              (no CAP_SYS_PTRACE), before fork(): bring every
                              page back and hold reclaim; OK once none is
                              swapped and no zap will be sent */
    UFS_FORK_DONE = 14,    /* header only, same connection, after fork():
                              reclaim may go on (closing the connection says
                              the same); no answer */
};

struct ufs_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint64_t seq;
}; /* 16 bytes */

/* HELLO flags */
#define UFS_HELLO_FORKED 0x1    /* child after fork(): no uffd attached; the
                                   server already holds it from EVENT_FORK */
#define UFS_HELLO_RECONNECT 0x2 /* the agent lost its server and is back */
#define UFS_HELLO_AUTO_MAPS 0x4 /* manage anonymous mappings found in
                                   /proc/PID/maps (LD_PRELOAD mode) */
#define UFS_HELLO_HELPER 0x8    /* sent by the agent's zap helper: a CLONE_VM
                                   child (own fd table, not a thread) of the
                                   managed process, which is its parent; the
                                   server checks that with kcmp(KCMP_VM) */

struct ufs_hello {
    struct ufs_hdr hdr;
    uint32_t flags;
    uint32_t reserved;
    uint64_t uffd_features; /* what UFFDIO_API granted the agent */
    uint64_t private_start; /* the agent's own mapping: never managed */
    uint64_t private_len;
    uint64_t beacon_addr; /* one page, registered MISSING and kept empty:
                             a forked child reads it to name its pid */
}; /* 56 bytes */

struct ufs_hello_ok {
    struct ufs_hdr hdr;
    uint32_t status; /* 0 */
    uint32_t reserved;
}; /* 24 bytes */

/* ZAP flags */
#define UFS_ZAP_MADVISE 0x1 /* one madvise() per range instead of one
                               vectored process_madvise() (benchmarks) */

struct ufs_range {
    uint64_t start;
    uint64_t len;
};

struct ufs_zap {
    struct ufs_hdr hdr;
    uint32_t count; /* 1..UFS_MAX_ZAP_RANGES */
    uint32_t flags;
    struct ufs_range ranges[]; /* count entries */
}; /* 24 + 16*count bytes */

struct ufs_zap_done {
    struct ufs_hdr hdr;
    int64_t result; /* bytes zapped, or -errno if nothing was */
    uint32_t ranges_done;
    int32_t error; /* errno of the first failure, 0 if none */
}; /* 32 bytes */

struct ufs_region {
    struct ufs_hdr hdr;
    uint64_t start;
    uint64_t len;
}; /* 32 bytes, REGISTER and UNREGISTER */

struct ufs_error {
    struct ufs_hdr hdr;
    int32_t error; /* errno */
    uint32_t len;  /* bytes of text that follow */
    char text[];
}; /* 24 + len bytes */

/* CTL and CTL_REPLY: struct ufs_hdr followed by UTF-8 JSON. */

#endif
