/* vsock_stream.c — one established host->guest stream served in C until anything else
 * happens (see vsock_stream.h). Caller-owned state, no malloc, no static state.
 *
 * Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "vring.h"
#include "vsock_path.h"
#include "vsock_stream.h"

enum { WATCH_KICK, WATCH_SOCK, WATCH_LOOP };

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The guest's credit for the connection (virtio 1.2 §5.10.6.3), 0 when none. */
static uint32_t credit_of(const struct vs_stream *s)
{
    uint32_t used = s->tx_cnt - s->peer_fwd_cnt;
    return s->peer_buf_alloc > used ? s->peer_buf_alloc - used : 0;
}

static int watch(int ep, int op, int fd, uint64_t tag)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    return epoll_ctl(ep, op, fd, &ev);
}

/* The guest's CREDIT_UPDATEs (and empty RW packets: credit fields only) waiting on the TX
 * queue, taken with no payload credit, so anything with payload stops the run untouched.
 * 1: go on; 0: return to Python (s->reason set). */
static int take_credit_updates(struct vr_queue *tq, struct vs_tx_lane *lane,
                               struct vs_stream *s)
{
    int rc;
    lane->credit = 0;
    lane->peer_buf_alloc = s->peer_buf_alloc;
    lane->peer_fwd_cnt = s->peer_fwd_cnt;
    rc = vs_tx_lane(tq, lane);
    if (rc < 0) {
        s->rc = rc;
        s->reason = VS_STREAM_TX_FAILED;
        return 0;
    }
    if (lane->chains) {
        s->tx_packets += lane->chains;
        s->credit_changed |= lane->credit_changed;
        s->peer_buf_alloc = lane->peer_buf_alloc;
        s->peer_fwd_cnt = lane->peer_fwd_cnt;
    }
    if (lane->stop == VS_STOP_BROKEN) {
        s->reason = VS_STREAM_TX_FAILED;
        return 0;
    }
    if (lane->stop != VS_STOP_EMPTY) {
        s->reason = VS_STREAM_TX;
        return 0;
    }
    return 1;
}

/* The host socket into the RX queue within the credit. 1: go on (drained, or stopped at
 * the credit with bytes left: the socket waits for the next CREDIT_UPDATE); 0: return to
 * Python with this pump's outputs uncounted (s->reason set). */
static int pump_once(struct vr_queue *rq, struct vr_scratch *rs, struct vs_rx_pump *pump,
                     struct vs_stream *s, uint32_t credit)
{
    int rc;
    pump->credit = credit;
    pump->fwd_cnt = s->fwd_cnt;
    rc = vs_rx_pump(rq, rs, pump);
    if (rc < 0 || pump->out.eof || pump->out.error || pump->out.broken
        || pump->out.starved || pump->call_errno) {
        s->rc = rc < 0 ? rc : 0;
        s->reason = VS_STREAM_RX;
        return 0;
    }
    s->bytes += pump->out.bytes;
    s->rx_packets += pump->out.chains;
    s->tx_cnt += (uint32_t)pump->out.bytes;
    return 1;
}

int vs_stream_serve(struct vr_queue *tq, struct vs_tx_lane *lane, struct vr_queue *rq,
                    struct vr_scratch *rs, struct vs_rx_pump *pump, struct vs_stream *s)
{
    struct epoll_event ready[3];
    int64_t deadline = s->timeout_ms < 0 ? -1 : now_ms() + s->timeout_ms;
    int ep, watching_sock = 0;

    s->bytes = 0;
    s->rx_packets = s->tx_packets = 0;
    s->credit_changed = s->rc = s->error = 0;
    s->events = 0;
    s->reason = VS_STREAM_ERROR;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 || watch(ep, EPOLL_CTL_ADD, s->kick_fd, WATCH_KICK) < 0
        || watch(ep, EPOLL_CTL_ADD, s->loop_fd, WATCH_LOOP) < 0) {
        s->error = errno;
        if (ep >= 0)
            close(ep);
        return s->reason;
    }
    for (;;) {
        int want = credit_of(s) > 0, n, timeout = -1, kick = 0, sock = 0, loop = 0;
        if (want != watching_sock) { /* read interest only while the guest has credit */
            if (watch(ep, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, s->sock_fd, WATCH_SOCK) < 0) {
                s->error = errno;
                break;
            }
            watching_sock = want;
        }
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        n = epoll_wait(ep, ready, 3, timeout);
        if (n < 0) {
            if (errno == EINTR) {
                s->reason = VS_STREAM_SIGNAL;
            } else {
                s->error = errno;
                s->reason = VS_STREAM_ERROR;
            }
            break;
        }
        if (n == 0) {
            s->reason = VS_STREAM_TIMEOUT;
            break;
        }
        s->events++;
        for (int i = 0; i < n; i++) {
            kick |= ready[i].data.u64 == WATCH_KICK;
            sock |= ready[i].data.u64 == WATCH_SOCK;
            loop |= ready[i].data.u64 == WATCH_LOOP;
        }
        if (kick) {
            uint64_t count;
            if (read(s->kick_fd, &count, sizeof count) < 0 && errno != EAGAIN
                && errno != EINTR) {
                s->error = errno;
                s->reason = VS_STREAM_ERROR;
                break;
            }
            if (!take_credit_updates(tq, lane, s))
                break;
        }
        if (loop) {
            s->reason = VS_STREAM_YIELD;
            break;
        }
        if (sock) {
            uint32_t credit = credit_of(s);
            if (credit && !pump_once(rq, rs, pump, s, credit))
                break;
        }
    }
    close(ep);
    return s->reason;
}
