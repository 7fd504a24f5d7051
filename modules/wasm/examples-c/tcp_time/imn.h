/*
 * The IMN host interface, ABI version 1, for modules written in C (clang, --target=wasm32).
 *
 * Every function is an import of module "imn"; the agent refuses a module that imports
 * anything else. Pointers and lengths are i32 offsets into the module's own memory; text
 * is UTF-8. A negative return is one of the IMN_E_* codes below, and last_error() then
 * has its message. A call that would pass one of the run's limits (packets, bytes,
 * sockets, the deadline) does not return: the run ends as "failed", naming the limit.
 * Every call costs fuel too: 1000, and 1 per 16 bytes it copies.
 *
 * A module exports its memory as "memory" and `int run(void)`: 0 after it called
 * result() once with a JSON object; anything else fails the run (with its last log line).
 * It has no start function. The authoritative description is the FUNCTIONS table at the
 * top of modules/probes/src/wasm/host.rs (the Rust guest declares the same imports in
 * modules/wasm/guest/src/sys.rs).
 */
#ifndef IMN_H
#define IMN_H

/* Freestanding: clang's own <stdint.h>, no libc needed. */
#include <stdint.h>

#define IMN_IMPORT(name) __attribute__((import_module("imn"), import_name(name)))

/* Error codes (negative returns). */
#define IMN_E_POLICY_DENIED (-1) /* the agent's policy refuses the address */
#define IMN_E_TIMEOUT (-2)       /* the call's timeout (or the run's deadline) came first */
#define IMN_E_IO (-3)            /* a network or system error; last_error() says which */
#define IMN_E_INVALID (-4)       /* a bad argument: pointer outside memory, bad handle... */
#define IMN_E_TOO_SMALL (-5)     /* the output does not fit the buffer (nothing written) */
#define IMN_E_UNAVAILABLE (-6)   /* not in this agent's build */
#define IMN_E_NOT_FOUND (-7)     /* the name does not resolve */

/* Log levels of imn_log(). */
#define IMN_LOG_DEBUG 0
#define IMN_LOG_INFO 1
#define IMN_LOG_WARN 2
#define IMN_LOG_ERROR 3

/* Writes the run's parameters (a JSON object) at ptr if they fit in cap; returns their
 * length either way (nothing is written when it is larger than cap). */
IMN_IMPORT("params") int32_t imn_params(uint8_t *ptr, int32_t cap);
/* Milliseconds left before the run's deadline (0 once passed). */
IMN_IMPORT("deadline_ms") int64_t imn_deadline_ms(void);
/* Monotonic clock, ns since the run started. */
IMN_IMPORT("clock_mono_ns") int64_t imn_clock_mono_ns(void);
/* Wall clock, ms since the Unix epoch. */
IMN_IMPORT("clock_wall_ms") int64_t imn_clock_wall_ms(void);
/* Fills len (at most 65536) bytes at ptr with random bytes: 0 or an error. */
IMN_IMPORT("random") int32_t imn_random(uint8_t *ptr, int32_t len);
/* One log line (at most 1024 bytes; control characters become spaces): 0. */
IMN_IMPORT("log") int32_t imn_log(int32_t level, const uint8_t *ptr, int32_t len);
/* The addresses of a name or a literal (at most 253 bytes), "\n"-separated, written at
 * out: their length or an error (IMN_E_TOO_SMALL if they do not fit out_cap). The lookup
 * counts as 2 packets of (the name's length + 40) bytes each, even for a literal. */
IMN_IMPORT("resolve")
int32_t imn_resolve(const uint8_t *name, int32_t name_len, uint8_t *out, int32_t out_cap);
/* Connects over TCP to host (a name or an address literal, at most 253 bytes) and port,
 * waiting at most timeout_ms (and never past the deadline): a handle or an error. The
 * connection attempt counts as one packet (a name's lookup as 2 more, as resolve's); a
 * handle counts as one socket until closed. */
IMN_IMPORT("tcp_connect")
int32_t imn_tcp_connect(const uint8_t *host, int32_t host_len, int32_t port, int32_t timeout_ms);
/* A connected UDP socket's handle, or an error. */
IMN_IMPORT("udp_open") int32_t imn_udp_open(const uint8_t *host, int32_t host_len, int32_t port);
/* Sends len (at most 65536) bytes: the bytes sent or an error. One packet. */
IMN_IMPORT("send") int32_t imn_send(int32_t handle, const uint8_t *ptr, int32_t len);
/* Receives at most cap bytes, waiting at most timeout_ms: the bytes received (TCP: 0 when
 * the peer closed) or an error. */
IMN_IMPORT("recv") int32_t imn_recv(int32_t handle, uint8_t *ptr, int32_t cap, int32_t timeout_ms);
/* Closes a handle: 0 or an error. */
IMN_IMPORT("close") int32_t imn_close(int32_t handle);
/* The agent's built-in ping and http modules: params is their JSON; their result JSON's
 * length, or an error (IMN_E_TOO_SMALL: call again, same params, with a larger buffer). */
IMN_IMPORT("ping")
int32_t imn_ping(const uint8_t *params, int32_t params_len, uint8_t *out, int32_t out_cap);
IMN_IMPORT("http")
int32_t imn_http(const uint8_t *params, int32_t params_len, uint8_t *out, int32_t out_cap);
/* The run's result: a JSON object of at most 65536 bytes, once. 0 or an error. */
IMN_IMPORT("result") int32_t imn_result(const uint8_t *ptr, int32_t len);
/* The message of the last error a call returned: writes as much as fits in cap and
 * returns the message's full length (IMN_E_INVALID if ptr is outside memory). */
IMN_IMPORT("last_error") int32_t imn_last_error(uint8_t *ptr, int32_t cap);

#endif
