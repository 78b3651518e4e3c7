/*
 * uffdsrv agent: public C API.
 *
 * The agent lives inside a managed process. Loaded with LD_PRELOAD and
 * UFFDSRV_SOCKET set, it starts by itself (AUTO_MAPS unless
 * UFFDSRV_AUTO_MAPS=0). Programs that want to choose what is managed link
 * libuffdsrv_agent.so (or dlopen it) and call these functions instead.
 *
 * Every function returns 0 on success or a negative errno value.
 */
#ifndef UFFDSRV_H
#define UFFDSRV_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define UFFDSRV_API __attribute__((visibility("default")))
#else
#define UFFDSRV_API
#endif

/* Let the server manage every anonymous mapping it finds in
 * /proc/PID/maps (same value as UFS_HELLO_AUTO_MAPS). */
#define UFFDSRV_AUTO_MAPS 0x4u

/* Create the process's userfaultfd, hand it to the server listening on
 * socket_path and start the zap thread. Idempotent: once started, calling
 * it again with the same path and flags returns 0; with a different path
 * or flags, -EBUSY. On failure the process stays unmanaged and may try
 * again. */
UFFDSRV_API int uffdsrv_agent_start(const char *socket_path, unsigned flags);

/* Ask the server to manage (or stop managing) [addr, addr+len). The range
 * must be page aligned anonymous private memory; the server checks it.
 * -ENOTCONN if the agent is not started. */
UFFDSRV_API int uffdsrv_register(void *addr, size_t len);
UFFDSRV_API int uffdsrv_unregister(void *addr, size_t len);

/* A short human-readable reason for the last failure of
 * uffdsrv_agent_start (or "managed" / "not started"). The string is
 * static; it is overwritten by the next start attempt. */
UFFDSRV_API const char *uffdsrv_agent_status(void);

#ifdef __cplusplus
}
#endif

#endif
