/* vsock_path.c — the vsock TX lane (see vsock_path.h for the contract).
 *
 * The behaviour twin is virtio/vsock/lane.py (tx_lane_py): same run, same stop reason, same
 * ring and guest-memory effects, same bytes on the socket; tests/property/
 * test_vsock_tx_lane.py checks the two against each other. The ring itself (pop, push, the
 * notify decision) is csrc/vring.c's; this file only classifies packets and gathers their
 * payloads. No static state, no malloc, no callbacks, no logging.
 *
 * Spec: virtio 1.2 §5.10.6, §5.10.6.1, §5.10.6.3.1, §5.10.6.4.
 */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vring.h"
#include "vsock_path.h"

_Static_assert(sizeof(struct vs_iov) == sizeof(struct iovec), "vs_iov is an iovec");
_Static_assert(offsetof(struct vs_iov, len) == offsetof(struct iovec, iov_len),
               "vs_iov is an iovec");

#define VS_HOST_CID 2u
#define VS_TYPE_STREAM 1u
#define VS_OP_RW 5u
#define VS_OP_CREDIT_UPDATE 6u

static inline uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    int k;
    for (k = 7; k >= 0; k--)
        v = (v << 8) | p[k];
    return v;
}

static inline uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* Does the popped chain belong to the run? VS_STOP_* (OTHER / CREDIT / FULL) if not, -1 if
 * it does; then its payload pieces are appended to lane->iov[*niov ..]. The header is copied
 * out of guest memory once and only the copy is read (STYLE R3: no TOCTOU). */
static int take_packet(struct vs_tx_lane *lane, uint32_t *niov, uint64_t credit_left)
{
    const struct vr_chain *c = &lane->chain;
    const struct vr_segment *seg = lane->seg;
    uint8_t h[VS_HDR_SIZE];
    uint32_t len, need, k, pieces;
    uint64_t first_room;

    if (c->nreadable == 0 || seg[0].len < VS_HDR_SIZE)
        return VS_STOP_OTHER;
    memcpy(h, seg[0].host, VS_HDR_SIZE);
    /* a stream RW packet, or a CREDIT_UPDATE without payload (only its credit fields
     * count: virtio 1.2 §5.10.6.3) */
    if ((le16(h + 30) != VS_OP_RW && !(le16(h + 30) == VS_OP_CREDIT_UPDATE
                                        && le32(h + 24) == 0))
        || le16(h + 28) != VS_TYPE_STREAM
        || le64(h + 0) != lane->cid || le64(h + 8) != VS_HOST_CID
        || le32(h + 20) != lane->host_port || le32(h + 16) != lane->guest_port)
        return VS_STOP_OTHER;
    len = le32(h + 24);
    if ((uint64_t)len > c->readable_bytes - VS_HDR_SIZE)
        return VS_STOP_OTHER; /* the general path drops it (len beyond the buffer) */
    if ((uint64_t)len > credit_left)
        return VS_STOP_CREDIT;
    /* count the payload pieces first: all or nothing */
    first_room = seg[0].len - VS_HDR_SIZE;
    pieces = 0;
    need = len;
    if (need && first_room) {
        pieces++;
        need -= (uint32_t)(first_room < need ? first_room : need);
    }
    for (k = 1; need && k < c->nreadable; k++) {
        pieces++;
        need -= seg[k].len < need ? seg[k].len : need;
    }
    if (*niov + pieces > VS_LANE_IOV)
        return VS_STOP_FULL;
    need = len;
    if (need && first_room) {
        uint32_t take = (uint32_t)(first_room < need ? first_room : need);
        lane->iov[*niov].base = seg[0].host + VS_HDR_SIZE;
        lane->iov[*niov].len = take;
        (*niov)++;
        need -= take;
    }
    for (k = 1; need && k < c->nreadable; k++) {
        uint32_t take = seg[k].len < need ? seg[k].len : need;
        lane->iov[*niov].base = seg[k].host;
        lane->iov[*niov].len = take;
        (*niov)++;
        need -= take;
    }
    {
        uint32_t ba = le32(h + 36), fc = le32(h + 40);
        if (ba != lane->peer_buf_alloc || fc != lane->peer_fwd_cnt)
            lane->credit_changed = 1;
        lane->peer_buf_alloc = ba;
        lane->peer_fwd_cnt = fc;
    }
    lane->bytes += len;
    if (le16(h + 30) == VS_OP_CREDIT_UPDATE)
        lane->credit_updates++;
    return -1;
}

/* One sendmsg of the gathered payloads; what the socket did not take goes to lane->tail. */
static void send_payloads(struct vs_tx_lane *lane, uint32_t niov)
{
    struct msghdr m;
    ssize_t r;
    uint64_t skip, k;

    if (lane->bytes) {
        memset(&m, 0, sizeof m);
        m.msg_iov = (struct iovec *)lane->iov;
        m.msg_iovlen = niov;
        do
            r = sendmsg(lane->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (r < 0 && errno == EINTR);
        if (r >= 0)
            lane->written = (uint64_t)r;
        else if (errno != EAGAIN && errno != EWOULDBLOCK)
            lane->error = errno;
    }
    lane->tail_len = lane->bytes - lane->written;
    skip = lane->written;
    {
        uint8_t *dst = lane->tail;
        for (k = 0; k < niov; k++) {
            uint64_t n = lane->iov[k].len;
            if (skip >= n) {
                skip -= n;
                continue;
            }
            memcpy(dst, lane->iov[k].base + skip, n - skip);
            dst += n - skip;
            skip = 0;
        }
    }
}

/* Complete n chains with one publication, make the notify decision and signal the call
 * eventfd if the ring asks: 0, or a negative VR_E_* (a ring area unmapped). */
static int publish(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                   const uint32_t *slots, uint32_t n, int32_t *notify, int32_t *call_errno)
{
    int rc = vr_push_batch(q, heads, lens, slots, n);
    if (rc < 0)
        return rc;
    rc = vr_should_notify(q);
    if (rc < 0)
        return rc;
    *notify = rc;
    if (rc)
        *call_errno = vr_signal_call(q);
    return 0;
}

/* Give back the chain just popped (the ring's position before the pop was last / wrap),
 * as ring.cring.Virtqueue.unpop does. */
static void give_back(struct vr_queue *q, uint16_t last, uint8_t wrap)
{
    q->last_avail_idx = last;
    q->avail_wrap = wrap;
    q->in_flight -= 1;
}

/* Connection._credit_check on the counters after a run: is a CREDIT_UPDATE due? (The
 * guest's view of our free space fell under the threshold and freeing it moved it by at
 * least the threshold, or to all of buf_alloc: virtio 1.2 §5.10.6.3.) */
static int update_due(const struct vs_tx_lane *lane, uint32_t recv, uint32_t fwd)
{
    int64_t view_free = (int64_t)lane->buf_alloc - (uint32_t)(recv - lane->adv_fwd_cnt);
    int64_t actual_free = (int64_t)lane->buf_alloc - (uint32_t)(recv - fwd);
    int64_t threshold = lane->update_threshold;
    return view_free < threshold && actual_free > view_free
           && (actual_free - view_free >= threshold || actual_free == lane->buf_alloc);
}

static void stream_header(uint8_t *h, uint64_t cid, uint32_t host_port, uint32_t guest_port,
                          uint16_t op, uint32_t buf_alloc, uint32_t fwd_cnt);

/* The CREDIT_UPDATE after a quiet run (vsock_path.h): put_status. */
static void put_update(struct vs_tx_lane *lane)
{
    uint32_t recv = lane->recv_cnt + (uint32_t)lane->bytes;
    uint32_t fwd = lane->fwd_cnt + (uint32_t)lane->written;
    uint8_t *h = lane->put->packet;

    if (!lane->update_owed && !update_due(lane, recv, fwd))
        return;
    stream_header(h, lane->cid, lane->host_port, lane->guest_port, VS_OP_CREDIT_UPDATE,
                  lane->buf_alloc, fwd);
    lane->put_status = vs_rx_put(lane->put_q, lane->put);
}

int vs_tx_lane(struct vr_queue *q, struct vs_tx_lane *lane)
{
    uint32_t niov = 0, n = 0, max_chains = lane->max_chains;
    uint64_t credit = lane->credit < lane->tail_cap ? lane->credit : lane->tail_cap;
    int rc;

    lane->chains = 0;
    lane->stop = VS_STOP_EMPTY;
    lane->bytes = lane->written = lane->tail_len = 0;
    lane->error = lane->broken = lane->credit_changed = 0;
    lane->notify = lane->call_errno = 0;
    lane->credit_updates = 0;
    lane->put_status = -1;
    if (max_chains > VS_LANE_CHAINS)
        max_chains = VS_LANE_CHAINS;
    if (q->pending_valid) { /* a partially written chain: not a vsock TX queue's state */
        lane->stop = VS_STOP_OTHER;
        return 0;
    }
    for (;;) {
        uint16_t last = q->last_avail_idx;
        uint8_t wrap = q->avail_wrap;
        int why;
        if (n >= max_chains) {
            lane->stop = VS_STOP_FULL;
            break;
        }
        rc = vr_pop(q, &lane->chain, lane->seg);
        if (rc < 0) {
            lane->stop = VS_STOP_BROKEN;
            lane->broken = rc;
            break;
        }
        if (rc == 0)
            break;
        why = take_packet(lane, &niov, credit - lane->bytes);
        if (why >= 0) {
            give_back(q, last, wrap);
            lane->stop = (uint32_t)why;
            break;
        }
        lane->heads[n] = lane->chain.head;
        lane->lens[n] = 0;
        lane->slots[n] = lane->chain.ring_slots;
        n++;
    }
    if (n == 0)
        return 0;
    send_payloads(lane, niov);
    lane->chains = n;
    rc = publish(q, lane->heads, lane->lens, lane->slots, n, &lane->notify,
                 &lane->call_errno);
    if (rc < 0)
        return rc;
    if (lane->put_q && lane->put && !lane->credit_changed && lane->tail_len == 0
        && lane->error == 0)
        put_update(lane);
    return 0;
}

int vs_rx_put(struct vr_queue *q, struct vs_rx_put *put)
{
    uint16_t last = q->last_avail_idx;
    uint8_t wrap = q->avail_wrap;
    const struct vr_chain *c = &put->chain;
    uint32_t k, done = 0, len = VS_HDR_SIZE;
    int rc;

    put->notify = put->call_errno = put->broken = 0;
    rc = vr_pop(q, &put->chain, put->seg);
    if (rc < 0) {
        put->broken = rc;
        return VS_PUT_BROKEN;
    }
    if (rc == 0)
        return VS_PUT_EMPTY;
    if (c->writable_bytes < VS_HDR_SIZE) {
        give_back(q, last, wrap);
        return VS_PUT_SMALL;
    }
    for (k = c->nreadable; k < c->nseg && done < VS_HDR_SIZE; k++) {
        const struct vr_segment *s = &put->seg[k];
        uint32_t take = s->len < VS_HDR_SIZE - done ? s->len : VS_HDR_SIZE - done;
        memcpy(s->host, put->packet + done, take);
        vr_log_write(q, q->regions[s->region].gpa + s->offset, take);
        done += take;
    }
    rc = publish(q, &c->head, &len, &c->ring_slots, 1, &put->notify, &put->call_errno);
    return rc < 0 ? rc : VS_PUT_DONE;
}

/* Headers the RX pump and the lane's CREDIT_UPDATE build from their inputs, little-endian
 * (Spec: virtio 1.2 §5.10.6: struct virtio_vsock_hdr). */
static void put_le(uint8_t *p, uint64_t v, int n)
{
    int k;
    for (k = 0; k < n; k++, v >>= 8)
        p[k] = (uint8_t)v;
}

/* A stream packet header from the host to the guest (len 0: vr_rx_from_fd_prefix patches
 * it per chain for RW; a CREDIT_UPDATE has none). */
static void stream_header(uint8_t *h, uint64_t cid, uint32_t host_port, uint32_t guest_port,
                          uint16_t op, uint32_t buf_alloc, uint32_t fwd_cnt)
{
    memset(h, 0, VS_HDR_SIZE);
    put_le(h + 0, VS_HOST_CID, 8);
    put_le(h + 8, cid, 8);
    put_le(h + 16, host_port, 4);
    put_le(h + 20, guest_port, 4);
    put_le(h + 28, VS_TYPE_STREAM, 2);
    put_le(h + 30, op, 2);
    put_le(h + 36, buf_alloc, 4);
    put_le(h + 40, fwd_cnt, 4);
}

int vs_rx_pump(struct vr_queue *q, struct vr_scratch *scratch, struct vs_rx_pump *p)
{
    uint8_t h[VS_HDR_SIZE];
    int rc;

    memset(&p->out, 0, sizeof p->out);
    p->call_errno = 0;
    if (p->credit == 0)
        return 0;
    stream_header(h, p->cid, p->host_port, p->guest_port, VS_OP_RW, p->buf_alloc, p->fwd_cnt);
    rc = vr_rx_from_fd_prefix(q, scratch, p->fd, p->credit, h, VS_HDR_SIZE, 24, &p->out);
    if (rc < 0)
        return rc;
    if (p->out.notify)
        p->call_errno = vr_signal_call(q);
    return 0;
}
