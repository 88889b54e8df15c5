/* The C stand-in for the guest's vsock driver in the streaming rows of the vsock scenario
 * (bench/vsock_guest.py sets the device up and accepts the connection in Python, then runs
 * this program for the timed interval): the Python guest model costs 30-120 us per 256 KiB
 * credit window, most of the back-end's budget; a Linux guest costs a few us.
 *
 * What it does is what the Linux 6.1 driver (net/vmw_vsock/virtio_transport.c and
 * virtio_transport_common.c) does where the back-end can tell:
 *   - RX buffers are a 44-byte header descriptor + a 4096-byte buffer (virtio_vsock_rx_fill
 *     before the sk_buff rework: two sgs, VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE), re-posted once
 *     fewer than half are posted (rx_buf_nr < rx_buf_max_nr / 2);
 *   - its receive window is buf_alloc (256 KiB); every header carries buf_alloc / fwd_cnt;
 *     the application reads everything at once, and a CREDIT_UPDATE goes out unprompted
 *     when a read leaves the peer's view of free space below 64 KiB
 *     (virtio_transport_stream_do_dequeue); a CREDIT_REQUEST is answered;
 *   - TX packets carry at most 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) and never exceed the
 *     peer's credit (virtio_transport_get_credit);
 *   - each TX packet's payload is copied into a buffer taken for that packet, given back
 *     once the device has used it, and the most recently given back is taken first (see
 *     "TX buffers" below);
 *   - VIRTIO_RING_F_EVENT_IDX: kick only when avail_event says (virtqueue_kick_prepare's
 *     vring_need_event); while it works it suppresses interrupts (disable_cb writes
 *     used_event far behind), and before sleeping it asks for an interrupt at the next used
 *     buffer (enable_cb: used_event = last used) and re-checks the ring.
 * Data is checked at the receiving end: host->guest payload must be the host source's bytes
 * (0x5a, bench/limits/peer.c), and each RX buffer is poisoned after use, so a used length
 * that claims bytes never written fails the run. Guest->host payload is copied into each
 * TX buffer as it is sent (as Linux copies the application's bytes into the packet): the
 * stream pattern, byte o of the stream = stream_pattern[o % PATTERN_PERIOD] (an xorshift32
 * byte sequence, also in bench/limits/peer.c, whose sink checks every byte, and
 * bench/vsock_guest.py), so a lost, reordered or invented byte fails the run.
 *
 * TX buffers. Linux 6.1 allocates each packet's payload buffer as it sends it and frees it
 * when the device has used it: virtio_transport_send_pkt_info -> virtio_transport_alloc_pkt
 * (virtio_transport_common.c) does `pkt->buf = kmalloc(len, GFP_KERNEL)` and
 * memcpy_from_msg, only when len > 0 (control packets have no buffer);
 * virtio_transport_tx_work (virtio_transport.c) takes used chains with virtqueue_get_buf
 * and calls virtio_transport_free_pkt, which kfree()s pkt->buf. 64 KiB is above SLUB's
 * largest kmalloc cache (8 KiB), so it is kmalloc_large: an order-4 block from the buddy
 * allocator, whose free lists hand out from the head, where a freed block is put (unless
 * it merges with a free buddy). The few packets in flight, about credit-worth (256 KiB),
 * thus reuse a few hot buffers, not one buffer per ring entry. Here: a pool of 64 KiB
 * buffers in guest RAM (tx_pool=, tx_pool_bufs=: one per TX chain, so it never runs dry)
 * with a free stack; each RW packet pops the top one and its chain's payload descriptor is
 * pointed at it as the chain is posted; a used chain pushes its buffer back. A control
 * packet's payload descriptor points at the idle buffer after the pool, which nothing
 * writes (the chains keep their two descriptors; the device reads hdr.len = 0 bytes). At
 * start, the outstanding chains' payload descriptors say which buffers are held, so this
 * program and the Python model (bench/vsock_guest.py, same rule) can take the rings over
 * from each other. The 44-byte headers stay in one small buffer per chain (Linux's are
 * in the kzalloc'd struct virtio_vsock_pkt, as hot).
 * TX chains are used in any order. Without VIRTIO_F_IN_ORDER the device may return the
 * chains in another order than they were made available (Spec: virtio 1.2 §2.7.8: the used
 * element's id names the head); a zero-copy transmit would, keeping a chain until the host
 * peer has read its pages (the back-end's was tried and reverted: bench/results/ANALYSIS.md,
 * "Sixth session"). Linux takes whatever head each used element names
 * (virtqueue_get_buf_ctx_split: "id is not a head" is a broken ring) and detach_buf_split
 * puts that chain's descriptors at the head of the free descriptor list, so the next
 * packet reuses the chain freed last. Here the chains stay pre-built (chain k is
 * descriptors k*segs..k*segs+segs-1), so the free list is one of chain slots, a stack; a
 * packet pops the top slot and writes its head into the avail ring. Which slots are free
 * cannot be read from the rings once chains complete out of order, so it is handed over
 * with the rest of the state: tx_free_chains= (slots, bottom to top, comma-separated; absent
 * for a TX ring with nothing outstanding, all slots free, slot 0 on top, as Linux's free
 * list starts at descriptor 0), and "tx_free_chains" in the JSON printed at the end.
 * RX buffers stay fixed, one per chain: the device fills the posted buffers in turn and
 * Linux keeps as many posted (virtio_vsock_rx_fill: kmalloc(4096) each, refilling from the
 * slab the buffers the application just freed), so what the device writes cycles over
 * the ring's worth of 4 KiB buffers in both (128 x 4 KiB = 512 KiB in the bench).
 *
 * usage: vsock_guest KEY=VALUE... (see main(); fds are inherited). Prints one JSON line with
 * the bytes moved and the final ring and connection state (the Python guest resumes from it).
 * Exit 3: a data or protocol check failed (message on stderr).
 *
 * Spec: virtio 1.2 §2.7 (split virtqueues), §2.7.10 (used_event / avail_event),
 * §5.10.6 (vsock device operation), §5.10.6.3 (buffer space management). */
#include "common.h"
#include <poll.h>
#include <sys/mman.h>

#define HDR 44
#define MAX_PKT 65536u
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define HOST_CID 2
/* The guest->host stream pattern's period (a prime: no packet or buffer size divides it). */
#define PATTERN_PERIOD 4093u
/* The most TX chains (queue size 32768 descriptors / 2 per chain) and "no pool buffer". */
#define MAX_CHAINS 16384u
#define NO_BUF 0xffffu

struct ring {
    uint16_t size, segs, chains;
    uint16_t avail_idx, last_used;
    volatile uint16_t *avail_idx_p, *avail_ring, *used_event;
    volatile uint16_t *used_idx_p, *avail_event;
    volatile uint32_t *used_ring; /* id, len pairs */
    volatile uint64_t *desc;      /* addr, (len | flags << 32 | next << 48) pairs */
    int kick_fd, call_fd;
    uint64_t kicks;
};

/* The TX payload buffers and chain slots (see the top comment): buffer i at
 * gpa + i * MAX_PKT, the idle buffer (control packets) at gpa + count * MAX_PKT. */
struct tx_pool {
    uint64_t gpa;
    unsigned count, top, low; /* low: the fewest free buffers seen (peak use = count - low) */
    unsigned chains_top;          /* free_chains[0..chains_top): free slots, last next out */
    uint16_t free[MAX_CHAINS];    /* free[0..top): the free stack, free[top - 1] next out */
    uint16_t held[MAX_CHAINS];    /* per chain: the buffer its packet holds, or NO_BUF */
    uint16_t free_chains[MAX_CHAINS];
    uint8_t posted[MAX_CHAINS];   /* per chain: made available and not yet used */
};

static uint8_t *ram;
static uint64_t ram_size, gpa_base;

static void fail(const char *what)
{
    fprintf(stderr, "vsock_guest: %s\n", what);
    exit(3);
}

static uint8_t *gpa_ptr(uint64_t gpa, uint64_t len)
{
    if (gpa < gpa_base || gpa - gpa_base + len > ram_size)
        fail("address outside guest RAM");
    return ram + (gpa - gpa_base);
}

static void ring_init(struct ring *r, uint64_t desc, uint64_t avail, uint64_t used,
                      unsigned size, unsigned segs)
{
    r->size = (uint16_t)size;
    r->segs = (uint16_t)segs;
    r->chains = (uint16_t)(size / segs);
    r->desc = (volatile uint64_t *)gpa_ptr(desc, 16ull * size);
    r->avail_idx_p = (volatile uint16_t *)gpa_ptr(avail + 2, 2);
    r->avail_ring = (volatile uint16_t *)gpa_ptr(avail + 4, 2ull * size);
    r->used_event = (volatile uint16_t *)gpa_ptr(avail + 4 + 2ull * size, 2);
    r->used_idx_p = (volatile uint16_t *)gpa_ptr(used + 2, 2);
    r->used_ring = (volatile uint32_t *)gpa_ptr(used + 4, 8ull * size);
    r->avail_event = (volatile uint16_t *)gpa_ptr(used + 4 + 8ull * size, 2);
}

/* The buffer of descriptor j of chain k (chains are pre-built: descriptors k*segs + j). */
static uint8_t *chain_buf(const struct ring *r, unsigned k, unsigned j, uint32_t *len)
{
    unsigned d = k * r->segs + j;
    uint64_t addr = r->desc[2 * d], word = r->desc[2 * d + 1];
    *len = (uint32_t)word;
    return gpa_ptr(addr, *len);
}

/* vring_need_event (Spec: virtio 1.2 §2.7.10). */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static void kick(struct ring *r)
{
    uint64_t one = 1;
    if (write(r->kick_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        die("kick");
    r->kicks++;
}

/* Make n more chains available (their heads are in the avail ring: RX slot s holds head
 * segs * (s mod chains), written once by the Python set-up; TX slots are written as each
 * packet is put, see put_tx); kick when the device asked (avail_event). */
static void publish(struct ring *r, unsigned n)
{
    uint16_t old = r->avail_idx, new_idx = (uint16_t)(old + n);
    if (!n)
        return;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    *r->avail_idx_p = new_idx;
    r->avail_idx = new_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (need_event(*r->avail_event, new_idx, old))
        kick(r);
}

static unsigned outstanding(const struct ring *r)
{
    return (uint16_t)(r->avail_idx - r->last_used);
}

static uint16_t used_idx(const struct ring *r)
{
    uint16_t v = *r->used_idx_p;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return v;
}

static uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t le16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint64_t le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

struct conn {
    uint64_t cid;
    uint32_t local_port, peer_port;
    uint32_t buf_alloc, fwd_cnt, rx_cnt, last_fwd_cnt, tx_cnt;
    uint32_t peer_buf_alloc, peer_fwd_cnt;
    uint64_t rx_bytes, tx_bytes;
    uint32_t tx_phase; /* stream offset of the next TX payload byte, mod PATTERN_PERIOD */
    int owe_credit_update;
};

/* stream_ref[j] = byte j % PATTERN_PERIOD of the pattern, long enough that any packet's
 * expected bytes are one contiguous run (xorshift32 from 0x9e3779b9, top byte). */
static uint8_t stream_ref[PATTERN_PERIOD + MAX_PKT];

static void make_stream_ref(void)
{
    uint32_t x = 0x9e3779b9u, j;
    for (j = 0; j < PATTERN_PERIOD; j++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        stream_ref[j] = (uint8_t)(x >> 24);
    }
    for (; j < sizeof stream_ref; j++)
        stream_ref[j] = stream_ref[j - PATTERN_PERIOD];
}

static uint32_t peer_credit(const struct conn *c)
{
    uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static uint8_t pattern[4096];

/* Take every used RX buffer: RW payload checked and consumed at once (fwd_cnt), credit
 * fields taken from every header of the connection. Returns payload bytes. */
static uint64_t receive(struct ring *rx, struct conn *c)
{
    uint16_t used = used_idx(rx);
    uint64_t total = 0;
    while (rx->last_used != used) {
        unsigned slot = rx->last_used & (rx->size - 1);
        unsigned head = rx->used_ring[2 * slot], ulen = rx->used_ring[2 * slot + 1];
        uint32_t hlen, blen;
        uint8_t *h, *b;
        if (head % rx->segs || head / rx->segs >= rx->chains)
            fail("used RX head is not a chain head");
        if (head / rx->segs != (rx->last_used % rx->chains))
            fail("RX buffers used out of order");
        h = chain_buf(rx, head / rx->segs, 0, &hlen);
        b = chain_buf(rx, head / rx->segs, 1, &blen);
        if (ulen < HDR)
            fail("RX used length below the header size");
        {
            uint32_t len = le32(h + 24);
            uint16_t type = le16(h + 28), op = le16(h + 30);
            if (le64(h) != HOST_CID || le64(h + 8) != c->cid || type != TYPE_STREAM
                || le32(h + 16) != c->peer_port || le32(h + 20) != c->local_port)
                fail("RX packet of another connection");
            if (ulen != HDR + (op == OP_RW ? len : 0) || len > blen)
                fail("RX used length does not match the header's len");
            c->peer_buf_alloc = le32(h + 36);
            c->peer_fwd_cnt = le32(h + 40);
            if (op == OP_RW) {
                uint32_t off;
                for (off = 0; off < len; off += sizeof pattern) {
                    uint32_t n = len - off < sizeof pattern ? len - off : sizeof pattern;
                    if (memcmp(b + off, pattern, n) != 0)
                        fail("host->guest payload differs from what the host sent");
                }
                if (len) { /* poison: a later used length over unwritten bytes fails */
                    b[0] = 0;
                    b[len - 1] = 0;
                }
                total += len;
            } else if (op == OP_CREDIT_REQUEST) {
                c->owe_credit_update = 1;
            } else if (op != OP_CREDIT_UPDATE) {
                fail("unexpected RX op (reset or shutdown) during the stream");
            }
            h[30] = h[31] = 0; /* poison the op */
        }
        rx->last_used++;
    }
    if (total) {
        c->rx_cnt += (uint32_t)total;
        c->fwd_cnt += (uint32_t)total; /* the application reads everything at once */
        c->rx_bytes += total;
        if (c->buf_alloc - (c->rx_cnt - c->last_fwd_cnt) < MAX_PKT)
            c->owe_credit_update = 1; /* virtio_transport_stream_do_dequeue */
    }
    if (outstanding(rx) < rx->chains / 2u) /* rx_buf_nr < rx_buf_max_nr / 2: refill */
        publish(rx, rx->chains - outstanding(rx));
    return total;
}

/* The payload descriptor (descriptor 1) of chain k. */
static volatile uint64_t *payload_desc(const struct ring *r, unsigned k)
{
    return &r->desc[2 * (k * r->segs + 1)];
}

/* Take over the TX rings as they are: the free chain slots are `free_chains` (see the top
 * comment; NULL: nothing outstanding), the other chains are outstanding, and every
 * outstanding chain whose payload descriptor points at a pool buffer holds it; the other
 * buffers are free (lowest index on top). */
static void pool_init(struct tx_pool *p, const struct ring *tx, uint64_t gpa, unsigned count,
                      const char *free_chains)
{
    unsigned i, k;
    static uint8_t taken[MAX_CHAINS];
    if (count < tx->chains || count > MAX_CHAINS)
        fail("the TX buffer pool needs one buffer per TX chain");
    p->gpa = gpa;
    p->count = count;
    gpa_ptr(gpa, (uint64_t)(count + 1) * MAX_PKT); /* pool and idle buffer inside RAM */
    p->chains_top = 0;
    if (!free_chains) {
        for (k = tx->chains; k-- > 0;)
            p->free_chains[p->chains_top++] = (uint16_t)k;
    } else {
        const char *s = free_chains;
        while (*s) {
            char *end;
            unsigned long v = strtoul(s, &end, 10);
            if (end == s || v >= tx->chains || p->chains_top >= tx->chains
                || (*end && *end != ','))
                fail("tx_free_chains= is not a list of TX chain slots");
            p->free_chains[p->chains_top++] = (uint16_t)v;
            s = *end ? end + 1 : end;
        }
    }
    for (k = 0; k < tx->chains; k++) {
        p->posted[k] = 1;
        p->held[k] = NO_BUF;
    }
    for (i = 0; i < p->chains_top; i++) {
        if (!p->posted[p->free_chains[i]])
            fail("tx_free_chains= names a slot twice");
        p->posted[p->free_chains[i]] = 0;
    }
    if (tx->chains - p->chains_top != outstanding(tx))
        fail("tx_free_chains= does not leave the outstanding TX chains");
    for (k = 0; k < tx->chains; k++) {
        uint64_t addr = *payload_desc(tx, k);
        if (!p->posted[k] || addr == gpa + (uint64_t)count * MAX_PKT)
            continue; /* free, or a control packet: no buffer */
        i = (unsigned)((addr - gpa) / MAX_PKT);
        if (addr < gpa || (addr - gpa) % MAX_PKT || i >= count || taken[i])
            fail("an outstanding TX chain's payload is not a pool buffer of its own");
        taken[i] = 1;
        p->held[k] = (uint16_t)i;
    }
    p->top = 0;
    for (i = count; i-- > 0;)
        if (!taken[i])
            p->free[p->top++] = (uint16_t)i;
    p->low = p->top;
}

/* Take the chains the device used, in whatever order it used them (Spec: virtio 1.2
 * §2.7.8), as virtqueue_get_buf_ctx_split does: each used element must name the head of an
 * outstanding chain; the chain's slot goes back on top of the free slots (detach_buf_split)
 * and its buffer on top of the free stack (virtio_transport_free_pkt: kfree(pkt->buf)). */
static void reap(struct ring *tx, struct tx_pool *p)
{
    uint16_t used = used_idx(tx);
    if ((uint16_t)(used - tx->last_used) > outstanding(tx))
        fail("TX used ring inconsistent: more used than outstanding");
    for (; tx->last_used != used; tx->last_used++) {
        unsigned id = tx->used_ring[2 * (tx->last_used & (tx->size - 1))];
        unsigned k = id / tx->segs;
        if (id % tx->segs || k >= tx->chains || !p->posted[k])
            fail("TX used ring inconsistent: a used id is not an outstanding chain's head");
        p->posted[k] = 0;
        p->free_chains[p->chains_top++] = (uint16_t)k;
        if (p->held[k] != NO_BUF) {
            p->free[p->top++] = p->held[k];
            p->held[k] = NO_BUF;
        }
    }
}

/* Queue one packet into the free TX chain on top, made available at ring position pos
 * (the caller checked there is a free chain). */
static void put_tx(struct ring *tx, struct tx_pool *p, struct conn *c, unsigned pos,
                   uint16_t op, uint32_t len)
{
    unsigned k = p->free_chains[--p->chains_top];
    uint32_t hlen;
    uint8_t *h = chain_buf(tx, k, 0, &hlen);
    uint64_t v64;
    uint32_t v32;
    uint16_t v16;
    v64 = c->cid; memcpy(h, &v64, 8);
    v64 = HOST_CID; memcpy(h + 8, &v64, 8);
    memcpy(h + 16, &c->local_port, 4);
    memcpy(h + 20, &c->peer_port, 4);
    memcpy(h + 24, &len, 4);
    v16 = TYPE_STREAM; memcpy(h + 28, &v16, 2);
    memcpy(h + 30, &op, 2);
    v32 = 0; memcpy(h + 32, &v32, 4);
    memcpy(h + 36, &c->buf_alloc, 4);
    memcpy(h + 40, &c->fwd_cnt, 4);
    c->last_fwd_cnt = c->fwd_cnt;
    if (op == OP_RW && len) { /* kmalloc(len), then the application's bytes: the pattern */
        uint64_t gpa;
        if (p->held[k] != NO_BUF || !p->top)
            fail("TX buffer pool inconsistent");
        p->held[k] = p->free[--p->top];
        if (p->top < p->low)
            p->low = p->top;
        gpa = p->gpa + (uint64_t)p->held[k] * MAX_PKT;
        if (len > (uint32_t)(payload_desc(tx, k)[1]))
            fail("TX payload larger than its descriptor");
        *payload_desc(tx, k) = gpa;
        memcpy(gpa_ptr(gpa, len), stream_ref + c->tx_phase, len);
        c->tx_phase = (uint32_t)((c->tx_phase + len) % PATTERN_PERIOD);
    } else {
        *payload_desc(tx, k) = p->gpa + (uint64_t)p->count * MAX_PKT; /* the idle buffer */
    }
    p->posted[k] = 1;
    tx->avail_ring[pos & (tx->size - 1u)] = (uint16_t)(k * tx->segs);
}

/* Control packets owed, then (tx workload) RW packets within credit and free chains. */
static uint64_t send(struct ring *tx, struct tx_pool *p, struct conn *c, int stream)
{
    unsigned free_chains, n = 0;
    uint64_t sent = 0;
    reap(tx, p);
    free_chains = tx->chains - outstanding(tx);
    if (c->owe_credit_update && free_chains) {
        put_tx(tx, p, c, tx->avail_idx + n++, OP_CREDIT_UPDATE, 0);
        c->owe_credit_update = 0;
    }
    if (stream) {
        uint32_t credit = peer_credit(c);
        while (n < free_chains && credit) {
            uint32_t len = credit < MAX_PKT ? credit : MAX_PKT;
            put_tx(tx, p, c, tx->avail_idx + n++, OP_RW, len);
            c->tx_cnt += len;
            c->tx_bytes += len;
            credit -= len;
            sent += len;
        }
    }
    publish(tx, n);
    return sent;
}

/* The value of KEY=, or NULL when absent. */
static const char *arg_str(int argc, char **argv, const char *key)
{
    size_t k = strlen(key);
    int i;
    for (i = 1; i < argc; i++)
        if (strncmp(argv[i], key, k) == 0 && argv[i][k] == '=')
            return argv[i] + k + 1;
    return NULL;
}

/* The number KEY= gives; a missing KEY= ends the program (exit 2). */
static uint64_t arg(int argc, char **argv, const char *key)
{
    const char *value = arg_str(argc, argv, key);
    if (!value) {
        fprintf(stderr, "vsock_guest: missing %s=\n", key);
        exit(2);
    }
    return strtoull(value, NULL, 0);
}

int main(int argc, char **argv)
{
    struct ring rx = {0}, tx = {0};
    struct conn c = {0};
    static struct tx_pool pool;
    int stream = (int)arg(argc, argv, "tx_workload");
    double seconds = (double)arg(argc, argv, "micros") / 1e6;
    uint64_t t0, end, moved0, wakeups = 0;

    memset(pattern, 0x5a, sizeof pattern);
    make_stream_ref();
    ram_size = arg(argc, argv, "ram_size");
    gpa_base = arg(argc, argv, "gpa_base");
    ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               (int)arg(argc, argv, "mem_fd"), (off_t)arg(argc, argv, "mem_offset"));
    if (ram == MAP_FAILED)
        die("mmap");
    ring_init(&rx, arg(argc, argv, "rx_desc"), arg(argc, argv, "rx_avail"),
              arg(argc, argv, "rx_used"), (unsigned)arg(argc, argv, "rx_size"), 2);
    ring_init(&tx, arg(argc, argv, "tx_desc"), arg(argc, argv, "tx_avail"),
              arg(argc, argv, "tx_used"), (unsigned)arg(argc, argv, "tx_size"), 2);
    rx.avail_idx = (uint16_t)arg(argc, argv, "rx_avail_idx");
    rx.last_used = (uint16_t)arg(argc, argv, "rx_last_used");
    tx.avail_idx = (uint16_t)arg(argc, argv, "tx_avail_idx");
    tx.last_used = (uint16_t)arg(argc, argv, "tx_last_used");
    rx.kick_fd = (int)arg(argc, argv, "rx_kick");
    rx.call_fd = (int)arg(argc, argv, "rx_call");
    tx.kick_fd = (int)arg(argc, argv, "tx_kick");
    tx.call_fd = (int)arg(argc, argv, "tx_call");
    c.cid = arg(argc, argv, "cid");
    c.local_port = (uint32_t)arg(argc, argv, "local_port");
    c.peer_port = (uint32_t)arg(argc, argv, "peer_port");
    c.buf_alloc = (uint32_t)arg(argc, argv, "buf_alloc");
    c.fwd_cnt = (uint32_t)arg(argc, argv, "fwd_cnt");
    c.rx_cnt = (uint32_t)arg(argc, argv, "rx_cnt");
    c.last_fwd_cnt = (uint32_t)arg(argc, argv, "last_fwd_cnt");
    c.tx_cnt = (uint32_t)arg(argc, argv, "tx_cnt");
    c.peer_buf_alloc = (uint32_t)arg(argc, argv, "peer_buf_alloc");
    c.peer_fwd_cnt = (uint32_t)arg(argc, argv, "peer_fwd_cnt");
    c.owe_credit_update = (int)arg(argc, argv, "owe_credit_update");
    c.tx_phase = (uint32_t)(arg(argc, argv, "tx_phase") % PATTERN_PERIOD);
    pool_init(&pool, &tx, arg(argc, argv, "tx_pool"),
              (unsigned)arg(argc, argv, "tx_pool_bufs"),
              arg_str(argc, argv, "tx_free_chains"));

    moved0 = 0;
    t0 = now_ns();
    end = t0 + (uint64_t)(seconds * 1e9);
    for (;;) {
        uint64_t got, sent;
        /* working: interrupts suppressed (disable_cb with EVENT_IDX: used_event behind) */
        *rx.used_event = (uint16_t)(rx.last_used - 1);
        *tx.used_event = (uint16_t)(tx.last_used - 1);
        got = receive(&rx, &c);
        sent = send(&tx, &pool, &c, stream);
        moved0 += stream ? sent : got;
        if (now_ns() >= end)
            break;
        if (got || sent || c.owe_credit_update)
            continue;
        /* nothing to do: enable_cb (interrupt at the next used buffer), re-check, sleep */
        *rx.used_event = rx.last_used;
        if (stream && outstanding(&tx))
            *tx.used_event = tx.last_used;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (used_idx(&rx) != rx.last_used || (stream && used_idx(&tx) != tx.last_used
                                              && peer_credit(&c)))
            continue;
        {
            struct pollfd p[2] = {{rx.call_fd, POLLIN, 0}, {tx.call_fd, POLLIN, 0}};
            uint64_t v;
            int i;
            wakeups++;
            if (poll(p, 2, 10) < 0 && errno != EINTR)
                die("poll");
            for (i = 0; i < 2; i++)
                if (p[i].revents & POLLIN && read(p[i].fd, &v, sizeof v) < 0 && errno != EAGAIN)
                    die("read call eventfd");
        }
    }
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"sleeps\": %llu, \"rx_kicks\": %llu, "
           "\"tx_kicks\": %llu, \"rx_avail_idx\": %u, \"rx_last_used\": %u, "
           "\"tx_avail_idx\": %u, \"tx_last_used\": %u, \"fwd_cnt\": %u, \"rx_cnt\": %u, "
           "\"last_fwd_cnt\": %u, \"tx_cnt\": %u, \"peer_buf_alloc\": %u, "
           "\"peer_fwd_cnt\": %u, \"rx_bytes\": %llu, \"tx_bytes\": %llu, "
           "\"owe_credit_update\": %d, \"tx_phase\": %u, \"tx_buffers_peak\": %u, "
           "\"tx_free_chains\": [",
           (unsigned long long)moved0, (double)(now_ns() - t0) / 1e9,
           (unsigned long long)wakeups, (unsigned long long)rx.kicks,
           (unsigned long long)tx.kicks, rx.avail_idx, rx.last_used, tx.avail_idx,
           tx.last_used, c.fwd_cnt, c.rx_cnt, c.last_fwd_cnt, c.tx_cnt, c.peer_buf_alloc,
           c.peer_fwd_cnt, (unsigned long long)c.rx_bytes, (unsigned long long)c.tx_bytes,
           c.owe_credit_update, c.tx_phase, pool.count - pool.low);
    {
        unsigned i;
        for (i = 0; i < pool.chains_top; i++)
            printf(i ? ", %u" : "%u", pool.free_chains[i]);
        printf("]}\n");
    }
    return 0;
}
