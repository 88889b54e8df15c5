/* zerocopy.h — internal interface of zerocopy.c for vring.c's transmit path (not read by
 * cffi: the caller-visible struct vr_zc and vr_pump_tx_release are in vring.h).
 *
 * Zero-copy transmit: a round's guest pieces are vmsplice(2)d into a pipe, which holds
 * references to the guest pages, and the pipe is splice(2)d into the host's AF_UNIX stream
 * socket, whose queued message then still refers to those pages; the host peer's read(2) is
 * the only copy. A chain whose bytes went that way is not returned to the guest until the
 * peer has read all of them (see zc_release), or the guest could overwrite bytes still
 * queued. Rounds too small for page references to pay (zc_wants) are written with writev(2)
 * as without zero copy, and those chains complete at once.
 */
#ifndef VMCHANNEL_ZEROCOPY_H
#define VMCHANNEL_ZEROCOPY_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* vring.h (no include guards: cffi reads it) must come first: struct vr_zc. */

/* Whether a round of `bytes` over `count` iovecs and `chains` chains goes through the pipe. */
int zc_wants(const struct vr_zc *z, uint64_t bytes, int count, uint32_t chains);

/* Move what the pipe still holds into the socket: 0, EAGAIN (the socket is full), or the
 * errno of a failed splice (the pipe's bytes are then dropped with the connection). Every
 * call must do this first, chains or not: the peer's reads may have made room. */
int zc_flush(struct vr_zc *z, int fd);

/* Hand a round to the socket: first what the pipe still holds from earlier rounds, then
 * these iovecs (vmsplice + splice, or writev when `by_pipe` is 0). Returns the bytes taken
 * from the iovecs (they are accounted in z->taken), or -1 with errno (EAGAIN: the socket is
 * full and nothing was taken). */
ssize_t zc_send(struct vr_zc *z, int fd, const struct iovec *iov, int count, int by_pipe);

/* Remember a fully taken chain ending at stream position `end` until its bytes are read.
 * Returns 0, or -1 when the list is full (the caller then completes it at once: a racing
 * hostile guest can make in_flight exceed the queue size only by breaking the ring). */
int zc_defer(struct vr_zc *z, uint32_t head, uint32_t slots, uint64_t end);

/* Move the remembered chains whose bytes the peer has read into heads/lens/slots (at most
 * `room`), oldest first. Returns how many. With no fd (< 0) or no SIOCOUTQ answer only those
 * that wait for no byte (end 0) go. */
uint32_t zc_release(struct vr_zc *z, int fd, uint32_t *heads, uint32_t *lens, uint32_t *slots,
                    uint32_t room);

/* The transmitq stops while the host peer stays: what the pipe held has been read out by the
 * owner (it is a copy now), so a remembered chain waits only for the bytes that reached the
 * socket: its end is clamped to in_socket. */
void zc_clamp(struct vr_zc *z);

/* The host peer went away: the old socket's references no longer matter, every remembered
 * chain may go back at once (end 0) and the new socket's stream starts at position 0. */
void zc_unpin(struct vr_zc *z);

/* Reset: empty the pipe unsent and move every remembered chain into heads/lens/slots (at
 * most `room`; the rest are forgotten). Returns how many. */
uint32_t zc_release_all(struct vr_zc *z, uint32_t *heads, uint32_t *lens, uint32_t *slots,
                        uint32_t room);

#endif
