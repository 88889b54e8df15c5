/* vsock_stream.h — the steady state of one established host->guest stream in C: the
 * connection's host socket read into the RX queue (vs_rx_pump) within the guest's credit,
 * and the guest's CREDIT_UPDATEs taken off the TX queue (vs_tx_lane with no credit of its
 * own: packets without payload only), event after event, until anything else happens.
 *
 * Python decides when (virtio/vsock/stream_loop.py): it enters this loop from its event loop
 * only for a connection in the RX pump's state with nothing else owed to the guest, after
 * taking the connection's socket and the TX kick eventfd out of its own epoll set, and it
 * passes its own epoll fd: the loop returns as soon as that fd is readable (anything for
 * Python: a vhost-user message, another socket, a kick of another queue, a signal's wake-up
 * byte), when the wait budget (Python's next timer) runs out, on EINTR, and on anything the
 * steady state does not cover (a TX packet other than a CREDIT_UPDATE/empty RW of this
 * connection, EOF, a read error, no RX buffers, a broken ring), leaving that event's outputs
 * in the lane or pump struct for Python's general path. Single-threaded: while it runs, no
 * Python runs, so guest memory, the queues and the connection's counters have one owner.
 *
 * Plain declarations and "#define NAME <integer>" only (cffi's cdef parser reads this file,
 * after vring.h and vsock_path.h). No malloc, no static state, no logging.
 *
 * Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit: never beyond
 * buf_alloc - (tx_cnt - fwd_cnt); every packet carries the sender's credit fields).
 */

/* Why the loop returned (struct vs_stream.reason). */
#define VS_STREAM_YIELD 0     /* the Python loop's epoll fd is readable */
#define VS_STREAM_TIMEOUT 1   /* the wait budget ran out */
#define VS_STREAM_SIGNAL 2    /* epoll_wait was interrupted (EINTR) */
#define VS_STREAM_TX 3        /* the TX lane stopped at a packet it does not take (stop is
                               * not VS_STOP_EMPTY; the credit-only packets before it are
                               * counted): Python's general TX path serves the queue */
#define VS_STREAM_TX_FAILED 4 /* the lane failed (rc < 0 in `rc`) or broke (stop
                               * VS_STOP_BROKEN, `broken` in the lane): its packets before the
                               * failure are counted */
#define VS_STREAM_RX 5        /* the last pump saw EOF, an error, no buffers or a broken ring,
                               * or failed (rc < 0): its outputs are in the pump struct and
                               * NOT counted here */
#define VS_STREAM_ERROR 6     /* epoll failed: errno in `error` */

struct vs_stream {
    /* inputs */
    int32_t kick_fd;          /* the TX queue's kick eventfd (non-blocking) */
    int32_t sock_fd;          /* the connection's host socket (non-blocking) */
    int32_t loop_fd;          /* the Python event loop's epoll fd */
    int32_t timeout_ms;       /* wait budget from the call, -1: none */
    /* in and out: the connection's counters (u32, wrapping) */
    uint32_t tx_cnt;          /* payload bytes sent to the guest */
    uint32_t peer_buf_alloc;  /* the guest's credit fields, last seen */
    uint32_t peer_fwd_cnt;
    uint32_t fwd_cnt;         /* ours, carried in every header (unchanged here) */
    /* outputs: what the loop did, counted */
    uint64_t bytes;           /* payload bytes read into the RX queue */
    uint32_t rx_packets;      /* RX chains published with them */
    uint32_t tx_packets;      /* TX packets taken (credit fields only) */
    int32_t credit_changed;   /* a TX packet's credit pair differed from the one before */
    int32_t reason;           /* VS_STREAM_* */
    int32_t rc;               /* the negative VR_E_* of a failed lane or pump call, else 0 */
    int32_t error;            /* errno of a failed epoll call, else 0 */
    uint32_t events;          /* epoll wake-ups served */
    int32_t reserved;
};

/* Serve the stream as above. The lane and pump structs carry their fixed inputs (CID,
 * ports, the socket, buf_alloc; the lane's put_q NULL); the loop sets their per-call fields.
 * Returns s->reason. */
int vs_stream_serve(struct vr_queue *tq, struct vs_tx_lane *lane, struct vr_queue *rq,
                    struct vr_scratch *rs, struct vs_rx_pump *pump, struct vs_stream *s);
