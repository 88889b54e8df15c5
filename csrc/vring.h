/* vring.h — the C hot path of ring/: virtqueue walking, used publication, notification
 * decisions and batched readv/writev between guest buffers and a host fd.
 *
 * This header is read twice: by the C compiler and by cffi's cdef parser (ring/_vring_build.py),
 * so it holds nothing but plain declarations and "#define NAME <integer>" constants: no
 * include guards, no #include, no macros with arguments, no inline code.
 *
 * Every structure is caller-owned (Python allocates it with ffi.new); the library keeps no
 * static state, never allocates, never calls back into Python and never logs.
 *
 * Return values: >= 0 success (a count where documented), or a negative VR_E_* code; the
 * codes are the negated ring.errors.ChainError values (the numbers are ABI: never renumber).
 *
 * Spec: virtio 1.2 §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues); docs/internals.md.
 */

#define VR_ABI_VERSION 5

#define VR_MAX_SEGMENTS 1024
#define VR_MAX_PREFIX 256
#define VR_MAX_QUEUE_SIZE 32768
#define VR_MAX_INDIRECT_ENTRIES 65536
#define VR_MAX_TOTAL_LEN 4294967295

#define VR_E_BROKEN -1
#define VR_E_AVAIL_IDX -2
#define VR_E_HEAD_RANGE -3
#define VR_E_LOOP -4
#define VR_E_NEXT_RANGE -5
#define VR_E_INDIRECT_NESTED -6
#define VR_E_INDIRECT_NEXT -7
#define VR_E_INDIRECT_LEN -8
#define VR_E_ORDER -9
#define VR_E_TOTAL_LEN -10
#define VR_E_ADDR -11
#define VR_E_TOO_MANY_SEGMENTS -12
#define VR_E_PACKED_WRAP -13
#define VR_E_NOT_READY -14
/* Not a ChainError: bad vr_rx_from_fd_prefix arguments (ring.cring checks them first). */
#define VR_E_PREFIX -100

/* One guest memory region. The table handed to the library is sorted by gpa and its regions
 * do not overlap (ring.memory.GuestMemory guarantees both). host points at the region's
 * first byte (ffi.from_buffer of Region.view). */
struct vr_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *host;
};

/* One piece of a chain's buffer: len bytes at offset in region table entry `region`
 * (host = regions[region].host + offset). Zero-length descriptors produce no segment. */
struct vr_segment {
    uint8_t *host;
    uint64_t offset;
    uint32_t len;
    uint32_t region;
};

/* A guest-physical byte range. */
struct vr_gpa_range {
    uint64_t gpa;
    uint64_t len;
};

/* One popped chain. Its segments are seg[0 .. nseg) of the segment array the call was given
 * starting at seg_start; the readable ones come first (a readable descriptor after a
 * writable one is an error), nreadable of them. */
struct vr_chain {
    uint32_t head;          /* split: head descriptor index; packed: buffer id */
    uint32_t ring_slots;    /* descriptors occupied in a packed ring; 1 for split */
    uint32_t seg_start;
    uint32_t nseg;
    uint32_t nreadable;
    uint32_t reserved;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
};

/* The queue: configuration, ring positions and the pending partial TX chain. */
struct vr_queue {
    /* configuration (set by the caller before vr_configure) */
    uint32_t size;
    uint8_t packed;
    uint8_t event_idx;
    uint8_t notify_on_empty;
    uint8_t configured;      /* set by vr_configure */
    uint64_t desc_gpa;       /* split: descriptor table;  packed: descriptor ring */
    uint64_t driver_gpa;     /* split: avail ring;        packed: driver event suppression */
    uint64_t device_gpa;     /* split: used ring;         packed: device event suppression */
    uint8_t *desc;           /* host pointers of the three areas (vr_configure) */
    uint8_t *driver;
    uint8_t *device;

    /* guest memory: the caller-owned region table and the dirty log (NULL = no logging) */
    struct vr_region *regions;
    uint32_t nregions;
    int32_t call_fd;         /* the queue's call eventfd (vhost-user SET_VRING_CALL), -1: none.
                              * Only vr_pump_* write it; the ring calls never do. */
    uint8_t *log;
    uint64_t log_size;

    /* state */
    uint16_t last_avail_idx; /* split: free-running; packed: position in 0 .. size-1 */
    uint16_t used_idx;       /* split: free-running; packed: position in 0 .. size-1 */
    uint8_t avail_wrap;      /* packed wrap counters (split: always 1) */
    uint8_t used_wrap;
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    uint8_t pending_valid;   /* a partially written TX chain is held in pending/pending_seg */
    uint16_t reserved1;
    uint32_t in_flight;
    int32_t broken;          /* 0, or the positive ChainError that broke the queue */
    int32_t error_head;      /* head/id of the chain the last failing pop returned used
                              * (length 0), or -1 when nothing was written */
    uint32_t reserved2;

    /* the partially written TX chain (ring.types.Pending): its readable (gpa, len) pieces */
    uint32_t pending_head;
    uint32_t pending_slots;
    uint32_t pending_nseg;
    uint32_t reserved3;
    uint64_t pending_offset; /* bytes of the pending chain already written */
    struct vr_gpa_range pending_seg[1024];
};

/* One chain gathered by a data-path round (internal to vr_tx_to_fd / vr_rx_from_fd; the
 * caller only provides the room, see struct vr_scratch). */
struct vr_entry {
    uint32_t head;
    uint32_t slots;
    uint64_t need;           /* TX: bytes left to write; RX: writable bytes */
    uint64_t prior;          /* TX: bytes of a pending chain written before this call */
    uint32_t seg_start;      /* first piece in the round's iovec array */
    uint32_t nseg;
    uint32_t was_pending;
    uint32_t reserved;
};

/* Caller-owned working room for the data path (ring.cring sizes it from the queue size):
 * entries for one round (size + 1 suffice: a round pops at most `size` chains plus the
 * pending one) and the completions of one call (published once at the end). A call stops
 * early rather than overflow either. */
struct vr_scratch {
    uint32_t entries_cap;
    uint32_t done_cap;
    struct vr_entry *entries;
    uint32_t *done_head;
    uint32_t *done_len;
    uint32_t *done_slots;
};

/* Outcome of vr_tx_to_fd. */
struct vr_tx_result {
    uint64_t bytes;          /* bytes written to the fd */
    uint32_t chains;         /* chains completed (pushed) */
    int32_t notify;          /* should_notify() after publication (0 if nothing completed) */
    int32_t blocked;         /* the fd returned EAGAIN or took fewer bytes than offered */
    int32_t error;           /* errno of another write failure, else 0 */
    int32_t broken;          /* positive ChainError when a hostile chain broke the queue */
    int32_t reserved;
};

/* Outcome of vr_rx_from_fd. */
struct vr_rx_result {
    uint64_t bytes;          /* bytes read into guest buffers */
    uint32_t chains;         /* chains pushed */
    int32_t notify;
    int32_t eof;             /* read returned 0 */
    int32_t starved;         /* no guest buffers left while the fd may have data */
    int32_t error;           /* errno of a read failure other than EAGAIN, else 0 */
    int32_t drained;         /* no more data now: EAGAIN, a short read, or all FIONREAD said */
    int32_t broken;          /* positive ChainError when a hostile chain broke the queue */
    int32_t reserved;
};

int vr_abi_version(void);

/* Set the three ring areas by guest-physical address, bounds-checked once here (an area may
 * cross adjacent regions). 0, or VR_E_ADDR with the failing area in *bad_gpa / *bad_len and
 * the queue unchanged. Does not touch the ring state (see vr_load_used_idx). */
int vr_configure(struct vr_queue *q, uint64_t desc_gpa, uint64_t driver_gpa,
                 uint64_t device_gpa, uint64_t *bad_gpa, uint64_t *bad_len);

/* Recompute the host pointers of the three areas after the region table changed: an area
 * inside one region gets a direct pointer, any other (crossing regions, or no longer
 * mapped) NULL, and is then reached through the region table on every access. */
void vr_refresh(struct vr_queue *q);

/* Translate [gpa, gpa+len) into at most max_seg segments; returns the segment count or
 * VR_E_ADDR (not wholly covered) or VR_E_TOO_MANY_SEGMENTS (covered, more than max_seg). */
int vr_translate(const struct vr_region *regions, uint32_t nregions, uint64_t gpa,
                 uint64_t len, struct vr_segment *seg, uint32_t max_seg);

/* Pop one chain: 1 (chain in *chain, segments in seg[0..]), 0 (ring empty) or VR_E_*.
 * seg must hold VR_MAX_SEGMENTS entries; chain->seg_start is 0. */
int vr_pop(struct vr_queue *q, struct vr_chain *chain, struct vr_segment *seg);

/* Pop up to max_chains chains into chains[]; their segments share seg[0 .. max_seg). Stops
 * early when fewer than VR_MAX_SEGMENTS segment slots are left. Returns the count (0 =
 * empty) or VR_E_*; on error *popped tells how many chains were popped before it (they are
 * in flight and must still be pushed). */
int vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t max_chains,
                 struct vr_segment *seg, uint32_t max_seg, uint32_t *popped);

/* Publish one used element (split: elem then idx; packed: id/len then flags). */
int vr_push(struct vr_queue *q, uint32_t head, uint32_t used_len, uint32_t ring_slots);

/* Publish n used elements, the used index (split) once at the end. heads/lens/slots are
 * parallel arrays. */
int vr_push_batch(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                  const uint32_t *slots, uint32_t n);

/* The call decision: 1 notify, 0 do not, or VR_E_NOT_READY. Updates signalled_used. */
int vr_should_notify(struct vr_queue *q);

/* The used buffer notification: add 1 to q->call_fd (nothing when it is -1). 0, or the
 * errno of a failed write (EAGAIN, a full counter, already means "signalled": 0). */
int vr_signal_call(const struct vr_queue *q);

/* Mark the dirty log (q->log, NULL: none) for len bytes written at guest-physical gpa. */
void vr_log_write(const struct vr_queue *q, uint64_t gpa, uint64_t len);

/* Split: read used->idx from guest memory into q->used_idx (configure, set_base).
 * 0, or VR_E_ADDR when the used ring is not mapped. */
int vr_load_used_idx(struct vr_queue *q);

/* Guest → host: see docs/internals.md "The batched data path" and ring/datapath.py.
 * max_bytes is the byte budget (the caller passes a huge value for "unlimited"). Returns 0
 * (hostile chains are reported in out->broken), or VR_E_* when the final publication or
 * notification decision failed (a ring area is unmapped). */
int vr_tx_to_fd(struct vr_queue *q, struct vr_scratch *scratch, int fd, uint64_t max_bytes,
                struct vr_tx_result *out);

/* Host → guest: as vr_tx_to_fd, the other direction. */
int vr_rx_from_fd(struct vr_queue *q, struct vr_scratch *scratch, int fd, uint64_t max_bytes,
                  struct vr_rx_result *out);

/* As vr_rx_from_fd, with the first prefix_len (<= VR_MAX_PREFIX) writable bytes of each chain
 * reserved: payload is read after them; each chain that received payload gets `prefix`
 * written in front, with its payload byte count as u32 little-endian at len_offset (if
 * len_offset >= 0; it must be <= prefix_len - 4); used length = prefix_len + payload. A chain
 * with no room after the prefix is treated like one with no writable bytes. max_bytes counts
 * payload bytes. Returns VR_E_PREFIX for bad prefix arguments. */
int vr_rx_from_fd_prefix(struct vr_queue *q, struct vr_scratch *scratch, int fd,
                         uint64_t max_bytes, const uint8_t *prefix, uint32_t prefix_len,
                         int32_t len_offset, struct vr_rx_result *out);

/* ---------------------------------------------------------------------------------------
 * The stream pump: one port of a stream device (a console port: a transmitq/receiveq pair
 * bridged to a host fd pair) served in one call, so that a guest kick or a readable host
 * socket costs the caller one crossing into C. Semantics: ring/pump.py (the reference).
 */

/* vr_pump_tx / vr_pump_rx return these bits (0: nothing for the caller to do), or a
 * negative VR_E_* when a ring area went unmapped. */
#define VR_PUMP_TX_BLOCKED 1     /* the write fd took fewer bytes than offered: watch it */
#define VR_PUMP_TX_MORE 2        /* the tx budget was used up: call again after others ran */
#define VR_PUMP_TX_ERROR 4       /* a write failed: tx_out.error */
#define VR_PUMP_TX_BROKEN 8      /* tx_out.broken */
#define VR_PUMP_RX_STARVED 16    /* no guest buffers while the read fd may have data */
#define VR_PUMP_RX_EOF 32
#define VR_PUMP_RX_ERROR 64      /* rx_out.error */
#define VR_PUMP_RX_BROKEN 128    /* rx_out.broken */
#define VR_PUMP_CALL_ERROR 256   /* a call eventfd write failed (not EAGAIN): call_errno */
#define VR_PUMP_KICK_ERROR 512   /* draining the kick eventfd failed (not EAGAIN): kick_errno */
#define VR_PUMP_TX_DEFERRED 1024 /* zero copy: chains wait until the host peer has read their
                                  * bytes; call vr_pump_tx again when the write fd reports
                                  * writable (edge-triggered: each read frees queued bytes) */

/* Zero-copy transmit (csrc/zerocopy.c, zerocopy.h): a chain whose bytes went to the write
 * fd by page reference waits in fifo until the peer has read them. */
struct vr_zc_chain {
    uint32_t head;
    uint32_t slots;
    uint64_t end;                 /* stream position just past its last byte */
};

struct vr_zc {
    int32_t pipe_r;               /* the caller's pipe (both ends O_NONBLOCK); pipe_w -1: off */
    int32_t pipe_w;
    uint64_t min_bytes;           /* rounds of fewer bytes are copied with writev */
    uint64_t min_piece;           /* ... and rounds of fewer bytes per iovec on average */
    uint32_t max_waiting;         /* ... and rounds that would make more chains wait */
    uint32_t reserved;
    uint64_t taken;               /* stream position: bytes taken from chains since a reset */
    uint64_t in_socket;           /* of those, handed to the write fd (the rest: in the pipe) */
    uint64_t piped;               /* running total of bytes sent by page reference */
    int32_t failed;               /* errno that turned zero copy off (vmsplice refused), or 0 */
    uint32_t cap;                 /* room in fifo (the queue size suffices) */
    uint32_t first;
    uint32_t count;               /* chains waiting for the peer */
    struct vr_zc_chain *fifo;
};

struct vr_pump {
    struct vr_queue *tx;          /* guest → host queue, NULL: not live */
    struct vr_scratch *tx_scratch;
    struct vr_queue *rx;          /* host → guest queue, NULL: not live */
    struct vr_scratch *rx_scratch;
    int32_t write_fd;             /* where the guest's bytes go, -1: no host peer */
    int32_t read_fd;              /* what is read for the guest, -1: not wanted now */
    uint64_t tx_budget;
    uint64_t rx_budget;
    uint64_t follow_rx_max;       /* after a tx step that wrote 1 .. this many bytes, also
                                   * read up to this many bytes for the guest (a small write
                                   * is likely a request whose answer is already there);
                                   * 0: never */
    uint64_t bytes_from_guest;    /* running totals of both directions */
    uint64_t bytes_to_guest;
    int32_t call_errno;
    int32_t kick_errno;
    int32_t ran_rx;               /* the last vr_pump_tx ran the rx step */
    int32_t reserved;
    struct vr_zc *tx_zc;          /* zero-copy transmit state, NULL: writev */
    struct vr_tx_result tx_out;   /* of the last tx step */
    struct vr_rx_result rx_out;   /* of the last rx step */
};

/* Guest → host: drain kick_fd (the transmitq's kick eventfd that woke the caller; -1: none),
 * vr_tx_to_fd(tx, write_fd, tx_budget), signal tx->call_fd if the ring asks, then
 * (follow_rx_max) the rx step with follow_rx_max as its budget. No ring work when tx is NULL
 * or write_fd < 0. */
int vr_pump_tx(struct vr_pump *p, int kick_fd);

/* Host → guest: vr_rx_from_fd(rx, read_fd, rx_budget), signal rx->call_fd if the ring asks.
 * Nothing when rx is NULL or read_fd < 0. */
int vr_pump_rx(struct vr_pump *p);

/* Zero copy: return every waiting chain to tx (used length 0, published, call signalled if
 * the ring asks) and drop what the pipe holds unsent. For a write fd about to go away (or the
 * pump's end; a stopping queue keeps them: vr_pump_tx_stop). VR_PUMP_CALL_ERROR, 0, or a
 * negative VR_E_*. */
int vr_pump_tx_release(struct vr_pump *p);

/* Zero copy (z: the pump's state; p->tx_zc may be NULL here), the transmitq p->tx stops while
 * the host peer stays (vhost-user GET_VRING_BASE). The caller has read what the pipe held
 * (taken == in_socket: those bytes are copies now). Every waiting chain's end is clamped to
 * in_socket; a partly sent chain (p->tx's pending one, unless the ring is broken) joins
 * them, ending at in_socket, and stops being pending; the chains the peer has read go back to p->tx now (published, call
 * signalled if the ring asks); the others stay in z, in flight: the queue's base counts them
 * consumed, and the socket still refers to their pages. VR_PUMP_CALL_ERROR, 0, or a negative
 * VR_E_*. */
int vr_pump_tx_stop(struct vr_pump *p, struct vr_zc *z);

/* Zero copy, a transmitq p->tx starts after vr_pump_tx_stop. continuing: it is the stopped
 * ring going on (same areas, size and indices): the kept chains count in flight in it and
 * those the peer has read go back now (the rest with the next vr_pump_tx calls, as ever).
 * Otherwise (a reset ring) they are forgotten: their heads mean nothing there.
 * VR_PUMP_CALL_ERROR, 0, or a negative VR_E_*. */
int vr_pump_tx_resume(struct vr_pump *p, struct vr_zc *z, int continuing);

/* Zero copy, the write fd changes while chains are kept: every kept chain waits for no read
 * any more (the old socket's references do not matter) and the stream position restarts. */
void vr_zc_unpin(struct vr_zc *z);
