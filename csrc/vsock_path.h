/* vsock_path.h — the vsock TX lane in C: the leading run of one connection's stream RW
 * packets (and CREDIT_UPDATEs without payload: credit fields only) taken off the TX virtqueue, their payloads written to the host socket with one
 * sendmsg straight from guest memory, the chains completed and the notify decision made, in
 * one call. Python keeps every decision: it names the connection and its credit, and
 * applies the counters afterwards (virtio/vsock/lane.py holds the pure-Python twin).
 *
 * Read by the C compiler and by cffi's cdef parser (ring/_vring_build.py, after vring.h):
 * plain declarations and "#define NAME <integer>" only, like vring.h. Caller-owned state,
 * no malloc, no static state, no logging.
 *
 * Spec: virtio 1.2 §5.10.6 (packet = 44-byte header + payload in one chain), §5.10.6.1 (TX
 * buffers are used without being written), §5.10.6.3.1 (credit), §5.10.6.4 (stream data).
 */

#define VS_HDR_SIZE 44
#define VS_LANE_CHAINS 256
#define VS_LANE_IOV 1024

/* Why the run ended (struct vs_tx_lane.stop). */
#define VS_STOP_EMPTY 0    /* the ring has no more available chains */
#define VS_STOP_OTHER 1    /* the next chain is not this connection's stream RW packet
                            * (or CREDIT_UPDATE with len 0), or
                            * its header is not whole in the first readable buffer, or its
                            * len exceeds the chain: given back for the general path */
#define VS_STOP_CREDIT 2   /* the next packet would exceed the credit: given back */
#define VS_STOP_FULL 3     /* max_chains taken, or the iovec room is used up */
#define VS_STOP_BROKEN 4   /* the pop failed: `broken` holds the VR_E_* code */

/* One gather element, laid out as struct iovec (checked at compile time). */
struct vs_iov {
    uint8_t *base;
    uint64_t len;
};

struct vs_rx_put;

struct vs_tx_lane {
    /* inputs that stay the same from run to run of one connection */
    uint64_t cid;              /* the VM's CID: src_cid of every packet of the run */
    uint32_t host_port;        /* dst_port of the run's packets */
    uint32_t guest_port;       /* src_port of the run's packets */
    int32_t fd;                /* the host socket (non-blocking) */
    uint32_t max_chains;       /* <= VS_LANE_CHAINS */
    uint8_t *tail;             /* room for the unwritten tail of the payloads */
    uint64_t tail_cap;
    /* the CREDIT_UPDATE the run may make due (Connection._credit_check after it), put
     * straight into the RX queue put_q when the run was quiet (every packet carried the
     * credit fields given, no tail, no send error); put_q NULL: never */
    struct vr_queue *put_q;
    struct vs_rx_put *put;     /* its working room */
    uint32_t buf_alloc;        /* our receive window */
    uint32_t update_threshold;
    /* inputs of every run, contiguous (Python packs them with one call) */
    uint64_t credit;           /* payload bytes the guest may still send (<= tail_cap) */
    /* in: the connection's view of the guest's credit fields; out: the last packet's */
    uint32_t peer_buf_alloc;
    uint32_t peer_fwd_cnt;
    uint32_t recv_cnt;         /* our u32 counters before the run (for put_q) */
    uint32_t fwd_cnt;
    uint32_t adv_fwd_cnt;      /* fwd_cnt in the last header we sent */
    int32_t update_owed;       /* a CREDIT_UPDATE is owed already */
    /* outputs */
    int32_t put_status;        /* -1: no put tried; VS_PUT_*; or a negative VR_E_* of the
                                * RX queue (publication or the notify decision failed) */
    uint32_t chains;           /* packets taken and completed (used length 0) */
    uint32_t stop;             /* VS_STOP_* */
    uint64_t bytes;            /* their payload bytes */
    uint64_t written;          /* of those, taken by the socket */
    uint64_t tail_len;         /* bytes - written, copied to tail */
    int32_t error;             /* errno of a failed send (not EAGAIN), else 0 */
    int32_t broken;            /* VR_E_* of a failed pop (stop = VS_STOP_BROKEN), else 0 */
    int32_t credit_changed;    /* a packet's buf_alloc/fwd_cnt differed from the one before */
    int32_t notify;            /* vr_should_notify after publication, 0 if nothing done */
    int32_t call_errno;        /* errno of a failed call eventfd write, else 0 */
    uint32_t credit_updates;   /* of the chains, CREDIT_UPDATEs (len 0) */
    /* working room */
    struct vr_chain chain;
    struct vr_segment seg[1024];
    struct vs_iov iov[1024];
    uint32_t heads[256];
    uint32_t lens[256];
    uint32_t slots[256];
};

/* Take the leading run (see the header comment): 0, or a negative VR_E_* when publication or
 * the notify decision failed (a ring area unmapped). Signals q->call_fd when the ring asks.
 * Then, when put_q is set and the run was quiet, the CREDIT_UPDATE decision on the counters
 * after it (recv_cnt + bytes, fwd_cnt + written) and, if one is due or owed, vs_rx_put of
 * that header (our buf_alloc and the new fwd_cnt) into put_q: put_status.
 * Chains that do not belong to the run are given back untouched (the ring's position is
 * rewound over them), so the caller's general path sees them next. */
int vs_tx_lane(struct vr_queue *q, struct vs_tx_lane *lane);

/* ---------------------------------------------------------------------------------------
 * One control packet (a 44-byte header, no payload: the CREDIT_UPDATE the TX path owes the
 * guest) into the next RX chain, published, the notify decision made and signalled, in one
 * call. The reference twin is virtio/vsock/lane.py put_packet_py.
 *
 * Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (CREDIT_UPDATE).
 */

#define VS_PUT_EMPTY 0     /* no RX buffer available: nothing done */
#define VS_PUT_DONE 1      /* written, used length 44 */
#define VS_PUT_SMALL 2     /* the next buffer cannot hold a header: given back untouched */
#define VS_PUT_BROKEN 3    /* the pop failed: `broken` holds the VR_E_* code */

struct vs_rx_put {
    uint8_t packet[44];        /* in: the header to deliver */
    int32_t notify;            /* out: the ring asked for (and got) a notification */
    int32_t call_errno;        /* out: errno of a failed call eventfd write, else 0 */
    int32_t broken;            /* out: VR_E_* of a failed pop, else 0 */
    int32_t reserved;
    struct vr_chain chain;     /* working room */
    struct vr_segment seg[1024];
};

/* VS_PUT_*, or a negative VR_E_* when publication or the notify decision failed. */
int vs_rx_put(struct vr_queue *q, struct vs_rx_put *put);

/* ---------------------------------------------------------------------------------------
 * The vsock RX pump: one host-readable event of an established stream connection served in
 * one call. The host socket is read straight into as many RX chains as the guest's credit
 * allows (vr_rx_from_fd_prefix: each chain gets the packet header built here in front, its
 * len patched with the chain's payload), the chains are published, the notify decision is
 * made and the queue's call eventfd signalled. Python decides (it names the connection and
 * its credit) and applies the counters afterwards; virtio/vsock/rx_pump.py holds the twin.
 *
 * Spec: virtio 1.2 §5.10.6 (one packet per RX buffer, header then payload), §5.10.6.3
 * (every header carries buf_alloc/fwd_cnt; RW within the guest's credit), §2.7.7 (used
 * buffer notification).
 */

struct vs_rx_pump {
    /* inputs: the header every packet carries, the credit, the host socket */
    uint64_t cid;              /* the VM's CID: dst_cid of every packet */
    uint32_t host_port;        /* src_port */
    uint32_t guest_port;       /* dst_port */
    uint32_t buf_alloc;        /* our receive window (Spec: virtio 1.2 §5.10.6.3) */
    uint32_t fwd_cnt;
    uint64_t credit;           /* payload bytes the guest can take now: the read budget */
    int32_t fd;                /* the host socket (non-blocking) */
    /* outputs */
    int32_t call_errno;        /* errno of a failed call eventfd write, else 0 */
    struct vr_rx_result out;   /* of the read (bytes, chains, notify, eof, drained, ...) */
};

/* 0 (out filled; nothing read when credit is 0), or a negative VR_E_* when publication or
 * the notify decision failed (a ring area unmapped). */
int vs_rx_pump(struct vr_queue *q, struct vr_scratch *scratch, struct vs_rx_pump *p);
