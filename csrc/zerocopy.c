/* zerocopy.c — zero-copy guest → host transmit for vring.c (see zerocopy.h).
 *
 * The stream position: z->taken counts the bytes taken from guest chains since the last
 * reset, in order, whichever way they went; z->in_socket counts those handed to the socket
 * (the rest, taken - in_socket, are still in the pipe). The socket's SIOCOUTQ is the memory
 * its unread messages occupy, never less than their bytes (each message is accounted with its
 * length plus overhead), and an AF_UNIX stream peer reads messages in order and frees each
 * once read. So every byte before in_socket - SIOCOUTQ has been read, and a chain ending
 * there may go back to the guest: its pages are no longer referenced by the socket.
 *
 * No static state, no malloc, no logging (vring.h's rules).
 *
 * Spec: virtio 1.2 §2.7.8 (the device returns a buffer through the used ring once it is done
 * with it: here, once the host peer has read its bytes), §5.3.6 (console transmitq buffers
 * are device-readable, used length 0); splice(2), vmsplice(2), unix(7) SIOCOUTQ.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vring.h"
#include "zerocopy.h"

int zc_wants(const struct vr_zc *z, uint64_t bytes, int count, uint32_t chains)
{
    return z->pipe_w >= 0 && z->failed == 0 && bytes >= z->min_bytes &&
           bytes >= (uint64_t)count * z->min_piece && z->count + chains <= z->max_waiting;
}

/* Move what the pipe holds into the socket. 0, or the errno that stopped it (EAGAIN: full). */
static int flush_pipe(struct vr_zc *z, int fd)
{
    while (z->taken > z->in_socket) {
        ssize_t r = splice(z->pipe_r, NULL, fd, NULL, (size_t)(z->taken - z->in_socket),
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EWOULDBLOCK ? EAGAIN : errno;
        }
        if (r == 0)
            return EIO; /* the pipe is empty though the count says otherwise: never loop */
        z->in_socket += (uint64_t)r;
    }
    return 0;
}

/* Empty the pipe without sending (the socket failed, or a reset): those bytes are lost with
 * the connection, as bytes in a closed socket's buffer are. */
static void discard_pipe(struct vr_zc *z)
{
    char sink[4096];
    uint64_t left = z->taken - z->in_socket;
    while (left > 0 && z->pipe_r >= 0) { /* the pipe is non-blocking; the count bounds it too */
        ssize_t r = read(z->pipe_r, sink, left < sizeof sink ? (size_t)left : sizeof sink);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        left -= (uint64_t)r;
    }
    z->taken = z->in_socket;
}

static ssize_t send_copy(struct vr_zc *z, int fd, const struct iovec *iov, int count)
{
    ssize_t r;
    do
        r = writev(fd, iov, count);
    while (r < 0 && errno == EINTR);
    if (r > 0) {
        z->taken += (uint64_t)r;
        z->in_socket += (uint64_t)r;
    }
    return r;
}

int zc_flush(struct vr_zc *z, int fd)
{
    int err = flush_pipe(z, fd);
    if (err && err != EAGAIN)
        discard_pipe(z);
    return err;
}

ssize_t zc_send(struct vr_zc *z, int fd, const struct iovec *iov, int count, int by_pipe)
{
    ssize_t r;
    int err = zc_flush(z, fd);
    if (err) {
        errno = err;
        return -1;
    }
    if (!by_pipe)
        return send_copy(z, fd, iov, count);
    do
        r = vmsplice(z->pipe_w, iov, (unsigned long)count, SPLICE_F_NONBLOCK);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) /* an empty pipe is never full */
            z->failed = EIO;
        else
            z->failed = errno; /* vmsplice unavailable (seccomp, an old kernel): copy */
        return send_copy(z, fd, iov, count);
    }
    z->taken += (uint64_t)r;
    z->piped += (uint64_t)r;
    err = flush_pipe(z, fd);
    if (err && err != EAGAIN) { /* the socket failed: nothing of this round counts as sent */
        discard_pipe(z);
        errno = err;
        return -1;
    }
    return r;
}

int zc_defer(struct vr_zc *z, uint32_t head, uint32_t slots, uint64_t end)
{
    struct vr_zc_chain *c;
    if (z->count >= z->cap)
        return -1;
    c = &z->fifo[(z->first + z->count) % z->cap];
    c->head = head;
    c->slots = slots;
    c->end = end;
    z->count++;
    return 0;
}

/* Move up to `room` remembered chains, oldest first, while they end at or before `limit`. */
static uint32_t take_oldest(struct vr_zc *z, uint64_t limit, uint32_t *heads, uint32_t *lens,
                            uint32_t *slots, uint32_t room)
{
    uint32_t n = 0;
    while (n < room && z->count > 0 && z->fifo[z->first].end <= limit) {
        heads[n] = z->fifo[z->first].head;
        lens[n] = 0;
        slots[n] = z->fifo[z->first].slots;
        n++;
        z->first = (z->first + 1) % z->cap;
        z->count--;
    }
    return n;
}

/* Bytes written to the socket outside this stream (the owner's own writes: the bytes a
 * stopped transmitq left unsent, written by Python before the ring runs again; or a previous
 * stream's bytes, before a reset set the position back to 0) are unread bytes too, so
 * SIOCOUTQ counts them: in_socket - SIOCOUTQ only gets smaller for them, and a chain is never
 * released early. Nor late for ever: once the peer has read everything SIOCOUTQ is 0 and
 * every chain ending at or before in_socket goes. */
uint32_t zc_release(struct vr_zc *z, int fd, uint32_t *heads, uint32_t *lens, uint32_t *slots,
                    uint32_t room)
{
    int unread = 0;
    if (z->count == 0 || room == 0)
        return 0;
    if (fd < 0 || ioctl(fd, SIOCOUTQ, &unread) < 0 || unread < 0)
        return take_oldest(z, 0, heads, lens, slots, room); /* cannot tell: only those that
                                                              * no longer wait for any read */
    /* The kernel frees a read message in two steps (net/core/sock.c sock_wfree: all of its
     * accounting but one unit, then the write-space wake-up, then that last unit), so a
     * writer woken by the peer's last read may see SIOCOUTQ 1 with nothing left queued; it
     * gets no later wake-up, and its last chain would wait for ever. A queued message
     * accounts its whole truesize (hundreds of bytes at least), so 1 means none. */
    if (unread == 1)
        unread = 0;
    return take_oldest(z, z->in_socket > (uint64_t)unread ? z->in_socket - (uint64_t)unread : 0,
                       heads, lens, slots, room);
}

void zc_clamp(struct vr_zc *z)
{
    uint32_t k;
    for (k = 0; k < z->count; k++) {
        struct vr_zc_chain *c = &z->fifo[(z->first + k) % z->cap];
        if (c->end > z->in_socket)
            c->end = z->in_socket;
    }
}

void zc_unpin(struct vr_zc *z)
{
    uint32_t k;
    discard_pipe(z);
    for (k = 0; k < z->count; k++)
        z->fifo[(z->first + k) % z->cap].end = 0;
    z->taken = z->in_socket = 0;
}

uint32_t zc_release_all(struct vr_zc *z, uint32_t *heads, uint32_t *lens, uint32_t *slots,
                        uint32_t room)
{
    uint32_t n;
    discard_pipe(z);
    n = take_oldest(z, UINT64_MAX, heads, lens, slots, room);
    z->first = 0;
    z->count = 0;
    z->taken = z->in_socket = 0;
    return n;
}
