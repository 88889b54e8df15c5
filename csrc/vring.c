/* vring.c — the C hot path of ring/ (see vring.h for the calling conventions).
 *
 * A byte-for-byte twin of the pure-Python reference ring.pyring: same checks in the same
 * order, same error codes, same guest memory writes and dirty-log bits. docs/internals.md is
 * the behaviour contract. No static state, no malloc, no callbacks, no logging.
 *
 * Spec: virtio 1.2 §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues).
 */

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vring.h"
#include "zerocopy.h"

#define DESC_SIZE 16u
#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define F_AVAIL (1u << 7)
#define F_USED (1u << 15)
#define AVAIL_F_NO_INTERRUPT 1u
#define EVENT_ENABLE 0u
#define EVENT_DISABLE 1u
#define PAGE_SHIFT 12

/* ---------------------------------------------------------------------------------------
 * Little-endian access to guest memory. Guest addresses need not be aligned (a hostile
 * driver picks them), so every access goes through memcpy.
 */

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}

static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void st16(uint8_t *p, uint16_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    memcpy(p, &v, 2);
}

static inline void st32(uint8_t *p, uint32_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

/* A descriptor copied once into locals (never re-read: TOCTOU). Split and packed share the
 * layout addr u64, len u32, then (flags, next) for split or (id, flags) for packed. */
struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next_or_id;
};

static inline void load_split_desc(const uint8_t *p, struct desc *d)
{
    d->addr = ld64(p);
    d->len = ld32(p + 8);
    d->flags = ld16(p + 12);
    d->next_or_id = ld16(p + 14);
}

static inline void load_packed_desc(const uint8_t *p, struct desc *d)
{
    d->addr = ld64(p);
    d->len = ld32(p + 8);
    d->next_or_id = ld16(p + 12);
    d->flags = ld16(p + 14);
}

/* ---------------------------------------------------------------------------------------
 * Guest memory: translate-and-clamp through the sorted region table.
 * Spec: vhost-user "Memory regions description".
 */

/* Index of the region holding byte gpa, or -1. */
static long find_region(const struct vr_region *r, uint32_t n, uint64_t gpa)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) { /* first region with r.gpa > gpa */
        uint32_t mid = lo + (hi - lo) / 2;
        if (r[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    lo--;
    if (gpa - r[lo].gpa >= r[lo].size)
        return -1;
    return (long)lo;
}

/* Count the pieces [gpa, gpa+len) splits into (len > 0); VR_E_ADDR if any byte is not
 * covered. A range may run from one region into the next only if that one starts exactly
 * where the first ends. Overflow-safe: compares offsets against sizes, never computes an
 * end that could wrap past 2^64. */
static long count_pieces(const struct vr_region *r, uint32_t n, uint64_t gpa, uint64_t len,
                         long *first)
{
    long i = find_region(r, n, gpa);
    long pieces = 0;
    uint64_t off, room;

    if (i < 0)
        return VR_E_ADDR;
    *first = i;
    off = gpa - r[i].gpa;
    for (;;) {
        room = r[i].size - off;
        pieces++;
        if (len <= room)
            return pieces;
        len -= room;
        /* the next byte is at r[i].gpa + r[i].size; a region ending at 2^64 is the last */
        if ((uint32_t)(i + 1) >= n || r[i + 1].gpa - r[i].gpa != r[i].size)
            return VR_E_ADDR;
        i++;
        off = 0;
    }
}

static void fill_pieces(const struct vr_region *r, long i, uint64_t gpa, uint64_t len,
                        struct vr_segment *seg)
{
    uint64_t off = gpa - r[i].gpa;
    while (len) {
        uint64_t room = r[i].size - off;
        uint64_t take = len < room ? len : room;
        seg->host = r[i].host + off;
        seg->offset = off;
        seg->len = (uint32_t)take;
        seg->region = (uint32_t)i;
        seg++;
        len -= take;
        i++;
        off = 0;
    }
}

int vr_translate(const struct vr_region *regions, uint32_t nregions, uint64_t gpa,
                 uint64_t len, struct vr_segment *seg, uint32_t max_seg)
{
    long first = 0, pieces;
    if (len == 0)
        return 0;
    if (len > UINT32_MAX) /* segments carry 32-bit lengths; the ring never asks for more */
        return VR_E_TOTAL_LEN;
    pieces = count_pieces(regions, nregions, gpa, len, &first);
    if (pieces < 0)
        return (int)pieces;
    if ((uint64_t)pieces > max_seg)
        return VR_E_TOO_MANY_SEGMENTS;
    fill_pieces(regions, first, gpa, len, seg);
    return (int)pieces;
}

/* Copy len guest bytes at gpa into dst; VR_E_ADDR if not wholly covered. */
static int read_guest(const struct vr_region *r, uint32_t n, uint64_t gpa, uint8_t *dst,
                      uint64_t len)
{
    long i = find_region(r, n, gpa);
    uint64_t off;
    if (len == 0)
        return 0;
    if (i < 0)
        return VR_E_ADDR;
    off = gpa - r[i].gpa;
    for (;;) {
        uint64_t room = r[i].size - off;
        uint64_t take = len < room ? len : room;
        memcpy(dst, r[i].host + off, take);
        dst += take;
        len -= take;
        if (!len)
            return 0;
        if ((uint32_t)(i + 1) >= n || r[i + 1].gpa - r[i].gpa != r[i].size)
            return VR_E_ADDR;
        i++;
        off = 0;
    }
}

/* Host pointer of [gpa, gpa+len) when it lies inside one region, else NULL. */
static uint8_t *contiguous(const struct vr_region *r, uint32_t n, uint64_t gpa, uint64_t len)
{
    long i = find_region(r, n, gpa);
    uint64_t off;
    if (i < 0)
        return NULL;
    off = gpa - r[i].gpa;
    if (len > r[i].size - off)
        return NULL;
    return r[i].host + off;
}

/* ---------------------------------------------------------------------------------------
 * Dirty-page log. Spec: vhost-user "Migration" (VHOST_USER_SET_LOG_BASE): one bit per
 * 4 KiB page, set atomically because the front-end reads it concurrently.
 */

void vr_log_write(const struct vr_queue *q, uint64_t gpa, uint64_t len)
{
    uint64_t page, last, limit;
    if (!q->log || len == 0 || q->log_size == 0)
        return;
    limit = q->log_size * 8;
    page = gpa >> PAGE_SHIFT;
    if (len - 1 > UINT64_MAX - gpa) /* clamp at the top of the address space */
        last = UINT64_MAX >> PAGE_SHIFT;
    else
        last = (gpa + len - 1) >> PAGE_SHIFT;
    if (page >= limit)
        return;
    if (last >= limit)
        last = limit - 1;
    for (; page <= last; page++)
        __atomic_fetch_or(&q->log[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
}

/* Copy data into guest memory at gpa (all or nothing); VR_E_ADDR if not wholly covered.
 * Marks the dirty log like ring.memory.GuestMemory.write. */
static int write_guest(const struct vr_queue *q, uint64_t gpa, const uint8_t *src,
                       uint64_t len)
{
    long i = 0, pieces;
    uint64_t off;
    if (len == 0)
        return 0;
    pieces = count_pieces(q->regions, q->nregions, gpa, len, &i);
    if (pieces < 0)
        return (int)pieces;
    off = gpa - q->regions[i].gpa;
    {
        uint64_t left = len;
        const uint8_t *s = src;
        while (left) {
            uint64_t room = q->regions[i].size - off;
            uint64_t take = left < room ? left : room;
            memcpy(q->regions[i].host + off, s, take);
            s += take;
            left -= take;
            i++;
            off = 0;
        }
    }
    vr_log_write(q, gpa, len);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Ring areas. Each access names the area's host pointer (NULL when the area is not inside
 * one region) and guest-physical start; a NULL pointer falls back to the region table, so an
 * access fails exactly when the reference's memory.read/write of that range would.
 * Failure is VR_E_ADDR ("ring area not mapped": the caller latches broken = ADDR).
 */

static int area_read(const struct vr_queue *q, const uint8_t *fast, uint64_t base,
                     uint64_t off, uint8_t *dst, uint32_t len)
{
    if (fast) {
        memcpy(dst, fast + off, len);
        return 0;
    }
    if (off > UINT64_MAX - base)
        return VR_E_ADDR;
    return read_guest(q->regions, q->nregions, base + off, dst, len);
}

static int area_write(const struct vr_queue *q, uint8_t *fast, uint64_t base, uint64_t off,
                      const uint8_t *src, uint32_t len)
{
    if (fast) {
        memcpy(fast + off, src, len);
        vr_log_write(q, base + off, len);
        return 0;
    }
    if (off > UINT64_MAX - base)
        return VR_E_ADDR;
    return write_guest(q, base + off, src, len);
}

static int area_ld16(const struct vr_queue *q, const uint8_t *fast, uint64_t base,
                     uint64_t off, uint16_t *v)
{
    uint8_t raw[2];
    int rc = area_read(q, fast, base, off, raw, 2);
    if (rc < 0)
        return rc;
    *v = ld16(raw);
    return 0;
}

static int area_st16(const struct vr_queue *q, uint8_t *fast, uint64_t base, uint64_t off,
                     uint16_t v)
{
    uint8_t raw[2];
    st16(raw, v);
    return area_write(q, fast, base, off, raw, 2);
}

/* ---------------------------------------------------------------------------------------
 * Configuration.
 */

static void area_sizes(const struct vr_queue *q, uint64_t *desc, uint64_t *driver,
                       uint64_t *device)
{
    *desc = (uint64_t)DESC_SIZE * q->size;
    if (q->packed) {
        *driver = 4; /* struct pvirtq_event_suppress */
        *device = 4;
    } else {
        *driver = 6 + 2 * (uint64_t)q->size; /* flags, idx, ring[size], used_event */
        *device = 6 + 8 * (uint64_t)q->size; /* flags, idx, ring[size], avail_event */
    }
}

int vr_abi_version(void)
{
    return VR_ABI_VERSION;
}

void vr_refresh(struct vr_queue *q)
{
    uint64_t s_desc, s_driver, s_device;
    area_sizes(q, &s_desc, &s_driver, &s_device);
    if (!q->configured) {
        q->desc = q->driver = q->device = NULL;
        return;
    }
    q->desc = contiguous(q->regions, q->nregions, q->desc_gpa, s_desc);
    q->driver = contiguous(q->regions, q->nregions, q->driver_gpa, s_driver);
    q->device = contiguous(q->regions, q->nregions, q->device_gpa, s_device);
}

/* Spec: virtio 1.2 §2.7 (the three parts of a split virtqueue), §2.8.10 (packed areas). */
int vr_configure(struct vr_queue *q, uint64_t desc_gpa, uint64_t driver_gpa,
                 uint64_t device_gpa, uint64_t *bad_gpa, uint64_t *bad_len)
{
    uint64_t sizes[3];
    uint64_t gpas[3] = {desc_gpa, driver_gpa, device_gpa};
    long first = 0;
    int k;

    area_sizes(q, &sizes[0], &sizes[1], &sizes[2]);
    for (k = 0; k < 3; k++) {
        if (sizes[k] && count_pieces(q->regions, q->nregions, gpas[k], sizes[k], &first) < 0) {
            if (bad_gpa)
                *bad_gpa = gpas[k];
            if (bad_len)
                *bad_len = sizes[k];
            return VR_E_ADDR;
        }
    }
    q->desc_gpa = desc_gpa;
    q->driver_gpa = driver_gpa;
    q->device_gpa = device_gpa;
    q->configured = 1;
    vr_refresh(q);
    return 0;
}

int vr_load_used_idx(struct vr_queue *q)
{
    uint16_t v;
    int rc;
    if (!q->configured || q->packed)
        return 0;
    rc = area_ld16(q, q->device, q->device_gpa, 2, &v);
    if (rc < 0)
        return rc;
    q->used_idx = v;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Chain walking, shared by split and packed rings.
 * Spec: virtio 1.2 §2.7.4.2, §2.7.5.2, §2.7.5.3 (indirect), §2.8.7 / §2.8.19 (packed).
 */

struct walk {
    const struct vr_queue *q;
    struct vr_segment *seg;  /* where this chain's segments go (VR_MAX_SEGMENTS room) */
    uint32_t nseg;
    uint32_t nreadable;
    int seen_write;          /* a WRITE descriptor was seen (even of length 0) */
    uint64_t total;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
};

/* One buffer descriptor: ORDER, TOTAL_LEN, ADDR, TOO_MANY_SEGMENTS, in that order.
 * Spec: virtio 1.2 §2.7.4.2 "The driver MUST place any device-writable descriptor elements
 * after any device-readable descriptor elements." */
static int add_buffer(struct walk *w, uint64_t addr, uint32_t len, int is_write)
{
    long first = 0, pieces;

    if (is_write)
        w->seen_write = 1;
    else if (w->seen_write)
        return VR_E_ORDER;
    w->total += len;
    if (w->total > 0xFFFFFFFFull)
        return VR_E_TOTAL_LEN;
    if (len == 0)
        return 0;
    pieces = count_pieces(w->q->regions, w->q->nregions, addr, len, &first);
    if (pieces < 0)
        return (int)pieces;
    if (w->nseg + (uint64_t)pieces > VR_MAX_SEGMENTS)
        return VR_E_TOO_MANY_SEGMENTS;
    fill_pieces(w->q->regions, first, addr, len, w->seg + w->nseg);
    w->nseg += (uint32_t)pieces;
    if (is_write) {
        w->writable_bytes += len;
    } else {
        w->nreadable += (uint32_t)pieces;
        w->readable_bytes += len;
    }
    return 0;
}

/* Validate an INDIRECT descriptor: nested, with NEXT, bad length, table outside memory.
 * Spec: virtio 1.2 §2.7.5.3.1 "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
 * within an indirect descriptor" and "MUST NOT set both VIRTQ_DESC_F_INDIRECT and
 * VIRTQ_DESC_F_NEXT in flags". */
static int check_indirect(const struct vr_queue *q, const struct desc *d, int nested,
                          int has_next)
{
    long first = 0;
    if (nested)
        return VR_E_INDIRECT_NESTED;
    if (has_next)
        return VR_E_INDIRECT_NEXT;
    if (d->len == 0 || d->len % DESC_SIZE)
        return VR_E_INDIRECT_LEN;
    if (d->len / DESC_SIZE > VR_MAX_INDIRECT_ENTRIES)
        return VR_E_INDIRECT_LEN;
    if (count_pieces(q->regions, q->nregions, d->addr, d->len, &first) < 0)
        return VR_E_ADDR;
    return 0;
}

/* Read entry k of a validated indirect table (it may cross adjacent regions). */
static void load_indirect(const struct vr_queue *q, uint64_t table, uint32_t k,
                          int packed, struct desc *d)
{
    uint8_t raw[DESC_SIZE];
    if (read_guest(q->regions, q->nregions, table + (uint64_t)k * DESC_SIZE, raw,
                   DESC_SIZE) < 0)
        memset(raw, 0, sizeof raw); /* unreachable: the whole table was checked */
    if (packed)
        load_packed_desc(raw, d);
    else
        load_split_desc(raw, d);
}

static void finish_chain(const struct walk *w, struct vr_chain *c, uint32_t head,
                         uint32_t slots, uint32_t seg_start)
{
    c->head = head;
    c->ring_slots = slots;
    c->seg_start = seg_start;
    c->nseg = w->nseg;
    c->nreadable = w->nreadable;
    c->reserved = 0;
    c->readable_bytes = w->readable_bytes;
    c->writable_bytes = w->writable_bytes;
}

/* Internal: a ring area access failed (the reference's RingAccessError). Never returned to
 * the caller: pop/push/should_notify turn it into broken = ADDR and VR_E_ADDR. */
#define RING_ACCESS (-1000)

static inline int ring_access(int rc)
{
    return rc < 0 ? RING_ACCESS : 0;
}

/* ---------------------------------------------------------------------------------------
 * Used publication.
 */

/* Split: elements at used_idx, then used->idx once.
 * Spec: virtio 1.2 §2.7.8.2 "The device MUST set len prior to updating the used idx." */
static int split_publish(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                         uint32_t n)
{
    uint16_t used_idx = q->used_idx;
    uint32_t k;
    uint8_t elem[8];
    for (k = 0; k < n; k++) {
        uint32_t slot = used_idx % q->size;
        st32(elem, heads[k]);
        st32(elem + 4, lens[k]);
        if (area_write(q, q->device, q->device_gpa, 4 + 8 * (uint64_t)slot, elem, 8) < 0)
            return RING_ACCESS;
        used_idx++;
    }
    /* the used elements must be visible before the index that publishes them */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (area_st16(q, q->device, q->device_gpa, 2, used_idx) < 0)
        return RING_ACCESS;
    q->used_idx = used_idx;
    return 0;
}

/* Packed: id and len of every element, then the flags, the first element's flags last so
 * the whole batch becomes visible at once (QEMU virtqueue_packed_flush).
 * Spec: virtio 1.2 §2.8.21 (the device writes flags after id and len), §2.8.1. */
static int packed_publish(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                          const uint32_t *slots, uint32_t n)
{
    uint32_t pos = q->used_idx, k;
    uint8_t wrap = q->used_wrap;
    uint8_t idlen[6];

    for (k = 0; k < n; k++) {
        st32(idlen, lens[k]);
        st16(idlen + 4, (uint16_t)heads[k]);
        if (area_write(q, q->desc, q->desc_gpa, DESC_SIZE * (uint64_t)pos + 8, idlen, 6) < 0)
            return RING_ACCESS;
        pos += slots[k];
        if (pos >= q->size) {
            pos -= q->size;
            wrap ^= 1;
        }
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    /* flags: elements 1 .. n-1 in order, then element 0 */
    pos = q->used_idx;
    wrap = q->used_wrap;
    for (k = 0; k < n; k++) {
        uint16_t flags = (wrap ? (uint16_t)(F_AVAIL | F_USED) : 0) |
                         (lens[k] ? (uint16_t)F_WRITE : 0);
        if (k > 0 && area_st16(q, q->desc, q->desc_gpa, DESC_SIZE * (uint64_t)pos + 14,
                               flags) < 0)
            return RING_ACCESS;
        pos += slots[k];
        if (pos >= q->size) {
            pos -= q->size;
            wrap ^= 1;
        }
    }
    if (n > 1)
        __atomic_thread_fence(__ATOMIC_RELEASE);
    if (area_st16(q, q->desc, q->desc_gpa, DESC_SIZE * (uint64_t)q->used_idx + 14,
                  (q->used_wrap ? (uint16_t)(F_AVAIL | F_USED) : 0) |
                      (lens[0] ? (uint16_t)F_WRITE : 0)) < 0)
        return RING_ACCESS;
    q->used_idx = (uint16_t)pos;
    q->used_wrap = wrap;
    return 0;
}

static int publish(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                   const uint32_t *slots, uint32_t n)
{
    if (q->packed)
        return packed_publish(q, heads, lens, slots, n);
    return split_publish(q, heads, lens, n);
}

/* A chain rule was broken: latch broken, and with a known head consume the chain and
 * return it used with length 0 (ring.pyring.Virtqueue._fail). */
static int fail_chain(struct vr_queue *q, int code, long head, uint32_t slots)
{
    q->broken = -code;
    q->error_head = (int32_t)head;
    if (head >= 0) {
        uint32_t h = (uint32_t)head, len0 = 0;
        if (q->packed) {
            q->last_avail_idx = (uint16_t)(q->last_avail_idx + slots);
            if (q->last_avail_idx >= q->size) {
                q->last_avail_idx = (uint16_t)(q->last_avail_idx - q->size);
                q->avail_wrap ^= 1;
            }
        } else {
            q->last_avail_idx++;
        }
        if (publish(q, &h, &len0, &slots, 1) < 0)
            q->broken = -VR_E_ADDR;
    }
    return code;
}

/* A ring area was not mapped: broken = ADDR, nothing written. */
static int fail_access(struct vr_queue *q)
{
    q->broken = -VR_E_ADDR;
    q->error_head = -1;
    return VR_E_ADDR;
}

/* ---------------------------------------------------------------------------------------
 * Split ring pop. Spec: virtio 1.2 §2.7.5, §2.7.13.2; check order per docs/internals.md.
 */

/* Spec: virtio 1.2 §2.7.5.2 "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes
 * in total; this implies that loops in the descriptor chain are forbidden!" */
static int split_walk(struct vr_queue *q, uint32_t head, struct walk *w)
{
    uint64_t table = 0;      /* indirect table gpa, when inside one */
    int in_indirect = 0;
    uint32_t table_len = q->size, idx = head, count = 0;
    struct desc d;
    uint8_t raw[DESC_SIZE];
    int rc;

    for (;;) {
        if (++count > table_len)
            return VR_E_LOOP;
        if (!in_indirect) {
            if (area_read(q, q->desc, q->desc_gpa, (uint64_t)DESC_SIZE * idx, raw, DESC_SIZE) < 0)
                return RING_ACCESS;
            load_split_desc(raw, &d);
        } else {
            load_indirect(q, table, idx, 0, &d);
        }
        if (d.flags & F_INDIRECT) {
            rc = check_indirect(q, &d, in_indirect, (d.flags & F_NEXT) != 0);
            if (rc < 0)
                return rc;
            in_indirect = 1;
            table = d.addr;
            table_len = d.len / DESC_SIZE;
            idx = 0;
            count = 0;
            continue;
        }
        rc = add_buffer(w, d.addr, d.len, (d.flags & F_WRITE) != 0);
        if (rc < 0)
            return rc;
        if (!(d.flags & F_NEXT))
            return 0;
        if (d.next_or_id >= table_len)
            return VR_E_NEXT_RANGE;
        idx = d.next_or_id;
    }
}

static int read_avail_idx(struct vr_queue *q, uint16_t *v)
{
    int rc = area_ld16(q, q->driver, q->driver_gpa, 2, v);
    /* the ring entries and descriptors must be read after the index */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return rc;
}

/* Spec: virtio 1.2 §2.7.13.2 — the driver is never more than `size` entries ahead. */
static int pending_count(struct vr_queue *q, uint16_t avail_idx, uint32_t *pending)
{
    *pending = (uint16_t)(avail_idx - q->last_avail_idx);
    if (*pending > q->size) {
        q->broken = -VR_E_AVAIL_IDX;
        q->error_head = -1;
        return VR_E_AVAIL_IDX;
    }
    return 0;
}

static int split_pop(struct vr_queue *q, struct walk *w, uint32_t *head_out)
{
    uint16_t avail_idx, head;
    uint32_t pending;
    int rc;

    if (read_avail_idx(q, &avail_idx) < 0)
        return fail_access(q);
    rc = pending_count(q, avail_idx, &pending);
    if (rc < 0)
        return rc;
    if (pending == 0) {
        if (!q->event_idx)
            return 0;
        /* Spec: virtio 1.2 §2.7.10: ask for a kick when the driver adds the next buffer,
         * then re-check once to close the race with the driver. */
        if (area_st16(q, q->device, q->device_gpa, 4 + 8 * (uint64_t)q->size,
                      q->last_avail_idx) < 0)
            return fail_access(q);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (read_avail_idx(q, &avail_idx) < 0)
            return fail_access(q);
        rc = pending_count(q, avail_idx, &pending);
        if (rc < 0)
            return rc;
        if (pending == 0)
            return 0;
    }
    if (area_ld16(q, q->driver, q->driver_gpa, 4 + 2 * (uint64_t)(q->last_avail_idx % q->size),
                  &head) < 0)
        return fail_access(q);
    if (head >= q->size) {
        q->broken = -VR_E_HEAD_RANGE;
        q->error_head = -1;
        return VR_E_HEAD_RANGE;
    }
    rc = split_walk(q, head, w);
    if (rc == RING_ACCESS)
        return fail_access(q);
    if (rc < 0)
        return fail_chain(q, rc, head, 1);
    q->last_avail_idx++;
    q->in_flight++;
    *head_out = head;
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * Packed ring pop. Spec: virtio 1.2 §2.8.1 (available: AVAIL == wrap, USED != wrap),
 * §2.8.4 (buffer id in the last descriptor), §2.8.6 (NEXT), §2.8.7 / §2.8.19 (indirect).
 */

static inline int is_available(uint16_t flags, int wrap)
{
    return ((flags & F_AVAIL) != 0) == wrap && ((flags & F_USED) != 0) != wrap;
}

static int packed_read_desc(struct vr_queue *q, uint32_t pos, struct desc *d)
{
    uint8_t raw[DESC_SIZE];
    if (area_read(q, q->desc, q->desc_gpa, (uint64_t)DESC_SIZE * pos, raw, DESC_SIZE) < 0)
        return RING_ACCESS;
    load_packed_desc(raw, d);
    return 0;
}

static int packed_pop(struct vr_queue *q, struct walk *w, uint32_t *head_out,
                      uint32_t *slots_out)
{
    uint32_t size = q->size, pos = q->last_avail_idx, slots = 0, k;
    int wrap = q->avail_wrap;
    struct desc d;
    int rc, last;

    if (packed_read_desc(q, pos, &d) < 0)
        return fail_access(q);
    if (!is_available(d.flags, wrap))
        return 0;
    /* the rest of the descriptor must be read after its flags said "available" */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (packed_read_desc(q, pos, &d) < 0)
        return fail_access(q);
    if (!is_available(d.flags, wrap))
        return 0;
    for (;;) {
        slots++;
        if (slots > size)
            return fail_chain(q, VR_E_LOOP, -1, 0);
        if (slots > 1) {
            if (packed_read_desc(q, pos, &d) < 0)
                return fail_access(q);
            if (!is_available(d.flags, wrap))
                return fail_chain(q, VR_E_PACKED_WRAP, -1, 0);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
        }
        last = !(d.flags & F_NEXT); /* an INDIRECT descriptor must be last (INDIRECT_NEXT) */
        if (d.flags & F_INDIRECT) {
            rc = check_indirect(q, &d, 0, (d.flags & F_NEXT) != 0);
            for (k = 0; rc == 0 && k < d.len / DESC_SIZE; k++) {
                struct desc e;
                load_indirect(q, d.addr, k, 1, &e);
                rc = add_buffer(w, e.addr, e.len, (e.flags & F_WRITE) != 0);
            }
        } else {
            rc = add_buffer(w, d.addr, d.len, (d.flags & F_WRITE) != 0);
        }
        if (rc < 0) {
            /* the buffer id sits in the last descriptor: known only if this one is last */
            if (last && d.next_or_id < size)
                return fail_chain(q, rc, d.next_or_id, slots);
            return fail_chain(q, rc, -1, 0);
        }
        pos++;
        if (pos >= size) {
            pos = 0;
            wrap = !wrap;
        }
        if (last)
            break;
    }
    if (d.next_or_id >= size)
        return fail_chain(q, VR_E_HEAD_RANGE, -1, 0);
    q->last_avail_idx = (uint16_t)pos;
    q->avail_wrap = (uint8_t)wrap;
    q->in_flight++;
    *head_out = d.next_or_id;
    *slots_out = slots;
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * Public pop / push / notify.
 */

/* One chain into chain/seg (seg has VR_MAX_SEGMENTS room); 1, 0 (empty) or VR_E_*. */
static int pop_one(struct vr_queue *q, struct vr_chain *chain, struct vr_segment *seg,
                   uint32_t seg_start)
{
    struct walk w;
    uint32_t head = 0, slots = 1;
    int rc;

    if (q->broken)
        return VR_E_BROKEN;
    if (!q->configured)
        return VR_E_NOT_READY;
    memset(&w, 0, sizeof w);
    w.q = q;
    w.seg = seg;
    if (q->packed)
        rc = packed_pop(q, &w, &head, &slots);
    else
        rc = split_pop(q, &w, &head);
    if (rc == 1)
        finish_chain(&w, chain, head, slots, seg_start);
    return rc;
}

int vr_pop(struct vr_queue *q, struct vr_chain *chain, struct vr_segment *seg)
{
    return pop_one(q, chain, seg, 0);
}

int vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t max_chains,
                 struct vr_segment *seg, uint32_t max_seg, uint32_t *popped)
{
    uint32_t n = 0, used = 0;
    int rc;
    *popped = 0;
    while (n < max_chains && max_seg - used >= VR_MAX_SEGMENTS) {
        rc = pop_one(q, &chains[n], seg + used, used);
        if (rc < 0) {
            *popped = n;
            return rc;
        }
        if (rc == 0)
            break;
        used += chains[n].nseg;
        n++;
    }
    *popped = n;
    return (int)n;
}

static int check_items(const struct vr_queue *q, const uint32_t *heads, const uint32_t *slots,
                       uint32_t n)
{
    uint32_t k;
    for (k = 0; k < n; k++)
        if (heads[k] >= q->size || slots[k] < 1 || slots[k] > q->size)
            return VR_E_HEAD_RANGE; /* the Python wrapper raises ValueError before this */
    return 0;
}

int vr_push_batch(struct vr_queue *q, const uint32_t *heads, const uint32_t *lens,
                  const uint32_t *slots, uint32_t n)
{
    int rc;
    if (n == 0)
        return 0;
    if (!q->configured)
        return VR_E_NOT_READY;
    rc = check_items(q, heads, slots, n);
    if (rc < 0)
        return rc;
    if (publish(q, heads, lens, slots, n) < 0)
        return fail_access(q);
    q->in_flight = q->in_flight > n ? q->in_flight - n : 0;
    return 0;
}

int vr_push(struct vr_queue *q, uint32_t head, uint32_t used_len, uint32_t ring_slots)
{
    return vr_push_batch(q, &head, &used_len, &ring_slots, 1);
}

/* vring_need_event: notify iff event lies in [old, new) modulo 2^16.
 * Spec: virtio 1.2 §2.7.10. */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static void event_shadow(struct vr_queue *q, uint16_t *old, uint16_t *new_idx, int *valid)
{
    *old = q->signalled_used;
    *new_idx = q->used_idx;
    *valid = q->signalled_used_valid;
    q->signalled_used = q->used_idx;
    q->signalled_used_valid = 1;
}

/* libvhost-user vu_should_notify / QEMU virtio_split_should_notify.
 * Spec: virtio 1.2 §2.7.10 (used_event, VRING_AVAIL_F_NO_INTERRUPT), §6
 * (VIRTIO_F_NOTIFY_ON_EMPTY). */
static int split_should_notify(struct vr_queue *q)
{
    uint16_t v, old, new_idx;
    int valid;
    if (q->notify_on_empty && q->in_flight == 0) {
        if (area_ld16(q, q->driver, q->driver_gpa, 2, &v) < 0)
            return RING_ACCESS;
        if (v == q->last_avail_idx)
            return 1;
    }
    if (!q->event_idx) {
        if (area_ld16(q, q->driver, q->driver_gpa, 0, &v) < 0)
            return RING_ACCESS;
        return !(v & AVAIL_F_NO_INTERRUPT);
    }
    event_shadow(q, &old, &new_idx, &valid);
    if (area_ld16(q, q->driver, q->driver_gpa, 4 + 2 * (uint64_t)q->size, &v) < 0)
        return RING_ACCESS;
    return !valid || need_event(v, new_idx, old);
}

/* QEMU virtio_packed_should_notify. Spec: virtio 1.2 §2.8.10 (driver event suppression). */
static int packed_should_notify(struct vr_queue *q)
{
    uint8_t raw[4];
    uint16_t off_wrap, flags, old, new_idx;
    int valid, off;
    if (area_read(q, q->driver, q->driver_gpa, 0, raw, 4) < 0)
        return RING_ACCESS;
    off_wrap = ld16(raw);
    flags = ld16(raw + 2);
    event_shadow(q, &old, &new_idx, &valid);
    if (flags == EVENT_DISABLE)
        return 0;
    if (flags == EVENT_ENABLE)
        return 1;
    off = off_wrap & 0x7FFF;
    if ((off_wrap >> 15) != q->used_wrap)
        off -= (int)q->size;
    return !valid || need_event((uint16_t)off, new_idx, old);
}

int vr_should_notify(struct vr_queue *q)
{
    int rc;
    if (!q->configured)
        return 0;
    /* the used ring writes must be visible before we read the driver's suppression state */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    rc = q->packed ? packed_should_notify(q) : split_should_notify(q);
    if (rc == RING_ACCESS)
        return fail_access(q);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The batched data path (ring/datapath.py is the reference; docs/internals.md "The batched
 * data path"). One writev/readv per round over the pieces of as many chains as fit in
 * VR_MAX_SEGMENTS iovecs; completions are published once per call.
 */

/* The round's iovecs and the guest range of each piece (kept apart from the iovecs, which
 * the byte limit may clip). count can exceed VR_MAX_SEGMENTS (only for a pending chain whose
 * memory was re-split): then only the first VR_MAX_SEGMENTS are stored and the round fails
 * with EINVAL like writev(2) with too many iovecs. */
struct gather {
    struct iovec iov[VR_MAX_SEGMENTS];
    struct vr_gpa_range piece[VR_MAX_SEGMENTS];
    uint64_t count;
};

static void gather_add(struct gather *g, uint8_t *host, uint64_t gpa, uint64_t len)
{
    if (g->count < VR_MAX_SEGMENTS) {
        g->iov[g->count].iov_base = host;
        g->iov[g->count].iov_len = len;
        g->piece[g->count].gpa = gpa;
        g->piece[g->count].len = len;
    }
    g->count++;
}

/* Give back the last `chains` popped chains (`slots` ring slots in total) unconsumed. */
static void rewind_chains(struct vr_queue *q, uint32_t slots, uint32_t chains)
{
    if (chains == 0)
        return;
    if (q->packed) {
        int32_t pos = (int32_t)q->last_avail_idx - (int32_t)slots;
        if (pos < 0) {
            pos += (int32_t)q->size;
            q->avail_wrap ^= 1;
        }
        q->last_avail_idx = (uint16_t)pos;
    } else {
        q->last_avail_idx = (uint16_t)(q->last_avail_idx - chains);
    }
    q->in_flight -= chains;
}

/* Number of iovecs covering the first `limit` bytes; clips the last one. */
static int clip_iov(struct gather *g, uint64_t limit)
{
    uint64_t k;
    for (k = 0; k < g->count && limit > 0; k++) {
        if (g->iov[k].iov_len > limit)
            g->iov[k].iov_len = limit;
        limit -= g->iov[k].iov_len;
    }
    return (int)k;
}

static void add_done(struct vr_scratch *s, uint32_t *ndone, uint32_t head, uint32_t len,
                     uint32_t slots)
{
    s->done_head[*ndone] = head;
    s->done_len[*ndone] = len;
    s->done_slots[*ndone] = slots;
    (*ndone)++;
}

/* Re-translate the rest of the pending chain (the memory table may have changed). */
static int gather_pending(struct vr_queue *q, struct gather *g)
{
    uint64_t skip = q->pending_offset;
    uint32_t k;
    struct vr_segment seg[64];
    for (k = 0; k < q->pending_nseg; k++) {
        uint64_t gpa = q->pending_seg[k].gpa, len = q->pending_seg[k].len, done = 0;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        gpa += skip;
        len -= skip;
        skip = 0;
        {
            long first = 0, pieces = count_pieces(q->regions, q->nregions, gpa, len, &first);
            if (pieces < 0)
                return VR_E_ADDR;
        }
        while (done < len) { /* in bounded steps: a piece never exceeds 4 GiB - 1 */
            uint64_t step = len - done, j;
            int n;
            if (step > 0xFFFFFFFFull)
                step = 0xFFFFFFFFull;
            n = vr_translate(q->regions, q->nregions, gpa + done, step, seg, 64);
            if (n == VR_E_TOO_MANY_SEGMENTS) { /* very fragmented memory: one region at a time */
                long r = find_region(q->regions, q->nregions, gpa + done);
                uint64_t room = q->regions[r].size - (gpa + done - q->regions[r].gpa);
                step = step < room ? step : room;
                n = vr_translate(q->regions, q->nregions, gpa + done, step, seg, 64);
            }
            for (j = 0; j < (uint64_t)n; j++)
                gather_add(g, seg[j].host, q->regions[seg[j].region].gpa + seg[j].offset,
                           seg[j].len);
            done += step;
        }
    }
    return 0;
}

static uint64_t pending_total(const struct vr_queue *q)
{
    uint64_t total = 0;
    uint32_t k;
    for (k = 0; k < q->pending_nseg; k++)
        total += q->pending_seg[k].len;
    return total;
}

static void set_pending(struct vr_queue *q, const struct vr_entry *e, const struct gather *g,
                        uint64_t offset)
{
    if (!e->was_pending) { /* a fresh chain: its readable pieces become the pending ranges */
        uint32_t k;
        for (k = 0; k < e->nseg; k++)
            q->pending_seg[k] = g->piece[e->seg_start + k];
        q->pending_nseg = e->nseg;
    }
    q->pending_head = e->head;
    q->pending_slots = e->slots;
    q->pending_offset = offset;
    q->pending_valid = 1;
}

static int is_again(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK;
}

/* The end of every data-path call: publish the completions once and make the notify
 * decision (ring/datapath.py's tail). A hostile chain was returned as (head, 0) by the walk
 * itself, so a broken batch is decided on too: the guest must hear of it. */
static int publish_batch(struct vr_queue *q, struct vr_scratch *s, uint32_t ndone,
                         int broken, int32_t *notify)
{
    int rc;
    *notify = 0;
    if (ndone) {
        rc = vr_push_batch(q, s->done_head, s->done_len, s->done_slots, ndone);
        if (rc < 0)
            return rc;
    }
    if (ndone || broken) {
        rc = vr_should_notify(q);
        if (rc < 0)
            return rc;
        *notify = rc;
    }
    return 0;
}

/* A chain all of whose bytes were taken: complete it now, or (zero copy, some of its bytes
 * sent by page reference) once the peer has read up to `end`. A copied chain behind waiting
 * ones waits too (with end 0: it goes as soon as they have), so chains still complete in the
 * order they were taken: a driver model may rely on that, and VIRTIO_F_IN_ORDER would. */
static void chain_taken(struct vr_zc *z, int by_reference, struct vr_scratch *s,
                        uint32_t *ndone, const struct vr_entry *e, uint64_t end)
{
    if (z != NULL && (by_reference || z->count > 0) &&
        zc_defer(z, e->head, e->slots, by_reference ? end : 0) == 0)
        return;
    add_done(s, ndone, e->head, 0, e->slots);
}

/* vr_tx_to_fd, with zero-copy transmit when z is not NULL (vr_pump_tx). */
static int tx_to_fd(struct vr_queue *q, struct vr_scratch *s, int fd, uint64_t budget,
                    struct vr_tx_result *out, struct vr_zc *z)
{
    struct gather g;
    struct vr_segment tmp[VR_MAX_SEGMENTS];
    struct vr_chain ch;
    uint64_t written_total = 0;
    uint32_t ndone = 0;
    int blocked = 0, error = 0, broken = 0, rc;

    if (z != NULL && z->taken > z->in_socket) { /* leftovers first, even with no new chain */
        int err = zc_flush(z, fd);
        if (err == EAGAIN)
            blocked = 1;
        else if (err)
            error = err;
    }
    while (written_total < budget && !blocked && !error) {
        uint32_t nent = 0, k, rewind_n = 0, rewind_slots = 0;
        uint64_t gathered = 0, limit, n = 0, remaining, position = z ? z->taken : 0;
        int stop = 0, by_pipe = 0, pipe_full = 0;

        if (ndone + s->entries_cap > s->done_cap)
            break; /* no room for another round's completions (a racing hostile guest) */
        g.count = 0;
        if (q->pending_valid) {
            struct vr_entry *e = &s->entries[nent++];
            if (gather_pending(q, &g) < 0) {
                error = EFAULT; /* the region went away under the chain */
                break;
            }
            e->head = q->pending_head;
            e->slots = q->pending_slots;
            e->need = pending_total(q) - q->pending_offset;
            e->prior = q->pending_offset;
            e->seg_start = 0;
            e->nseg = 0;
            e->was_pending = 1;
            gathered += e->need;
        }
        while (gathered < budget - written_total && !broken && nent < s->entries_cap) {
            struct vr_entry *e;
            rc = pop_one(q, &ch, tmp, 0);
            if (rc < 0) {
                broken = -rc;
                break;
            }
            if (rc == 0)
                break;
            if (g.count && g.count + ch.nreadable > VR_MAX_SEGMENTS) {
                rewind_chains(q, ch.ring_slots, 1);
                break;
            }
            e = &s->entries[nent++];
            e->head = ch.head;
            e->slots = ch.ring_slots;
            e->need = ch.readable_bytes;
            e->prior = 0;
            e->seg_start = (uint32_t)g.count;
            e->nseg = ch.nreadable;
            e->was_pending = 0;
            for (k = 0; k < ch.nreadable; k++)
                gather_add(&g, tmp[k].host, q->regions[tmp[k].region].gpa + tmp[k].offset,
                           tmp[k].len);
            gathered += ch.readable_bytes;
        }
        if (nent == 0)
            break;
        limit = gathered < budget - written_total ? gathered : budget - written_total;
        if (limit > 0) {
            if (g.count > VR_MAX_SEGMENTS) {
                error = EINVAL;
            } else {
                int cnt = clip_iov(&g, limit);
                ssize_t r;
                if (z != NULL) {
                    by_pipe = zc_wants(z, limit, cnt, nent);
                    r = zc_send(z, fd, g.iov, cnt, by_pipe);
                    pipe_full = z->taken > z->in_socket;
                } else {
                    do
                        r = writev(fd, g.iov, cnt);
                    while (r < 0 && errno == EINTR);
                }
                if (r < 0) {
                    if (is_again(errno))
                        blocked = 1;
                    else
                        error = errno;
                } else {
                    n = (uint64_t)r;
                }
            }
        }
        written_total += n;
        /* distribute the written bytes over the entries, in order */
        remaining = n;
        q->pending_valid = 0;
        for (k = 0; k < nent; k++) {
            struct vr_entry *e = &s->entries[k];
            if (stop) {
                if (!e->was_pending) {
                    rewind_n++;
                    rewind_slots += e->slots;
                }
                continue;
            }
            if (remaining >= e->need) {
                remaining -= e->need;
                position += e->need;
                /* a pending chain's earlier bytes may have gone by reference */
                chain_taken(z, by_pipe || e->was_pending, s, &ndone, e, position);
                continue;
            }
            stop = 1;
            if (e->was_pending || remaining > 0) {
                set_pending(q, e, &g, e->prior + remaining);
                remaining = 0;
            } else {
                rewind_n++;
                rewind_slots += e->slots;
            }
        }
        if (!broken) {
            rewind_chains(q, rewind_slots, rewind_n);
        } else { /* cannot rewind across the broken chain: return untouched chains empty */
            for (k = nent - rewind_n; k < nent; k++)
                add_done(s, &ndone, s->entries[k].head, 0, s->entries[k].slots);
        }
        if (pipe_full && !error) {
            blocked = 1; /* the socket is full; the pipe holds the rest of what it took */
            break;
        }
        if (by_pipe && n > 0 && !broken)
            continue; /* the pipe took less than offered but the socket took it all: go on */
        if (n < limit && !blocked && !error)
            blocked = 1; /* a short write: the fd's buffer is full (no extra EAGAIN syscall) */
        if (q->pending_valid || n < limit || broken)
            break;
    }
    if (z != NULL && ndone < s->done_cap)
        ndone += zc_release(z, fd, s->done_head + ndone, s->done_len + ndone,
                            s->done_slots + ndone, s->done_cap - ndone);
    out->bytes = written_total;
    out->chains = ndone;
    out->blocked = blocked;
    out->error = error;
    out->broken = broken;
    return publish_batch(q, s, ndone, broken, &out->notify);
}

/* Spec: virtio 1.2 §2.7.13 / §2.8.21 (device side of the used ring), §5.3.6 (console data:
 * transmitq buffers are device-readable). */
int vr_tx_to_fd(struct vr_queue *q, struct vr_scratch *s, int fd, uint64_t budget,
                struct vr_tx_result *out)
{
    return tx_to_fd(q, s, fd, budget, out, NULL);
}

/* Pieces a chain's writable part gives when its first plen bytes are a prefix: one per
 * writable segment, plus one when the prefix ends inside a segment. */
static uint32_t rx_pieces(const struct vr_chain *ch, const struct vr_segment *tmp, uint32_t plen)
{
    uint32_t k, nw = ch->nseg - ch->nreadable;
    uint64_t before = 0;
    if (plen == 0)
        return nw;
    for (k = ch->nreadable; k < ch->nseg; k++) {
        if (before < plen && plen < before + tmp[k].len)
            return nw + 1;
        before += tmp[k].len;
    }
    return nw;
}

/* Bytes a round should gather room for, asked once the round holds its first chain:
 * FIONREAD's count when the fd has data, 1 (that one chain: the readv sees EOF or EAGAIN)
 * when it reports none, and no bound when the fd cannot tell (not a socket, pipe, tty or
 * file). *known is set when the count came from the fd. ring/datapath.py: _wanted. */
static uint64_t rx_wanted(int fd, int *known)
{
    int avail = 0;
    *known = 0;
    if (ioctl(fd, FIONREAD, &avail) < 0)
        return UINT64_MAX;
    if (avail <= 0)
        return 1;
    *known = 1;
    return (uint64_t)avail;
}

int vr_rx_from_fd(struct vr_queue *q, struct vr_scratch *s, int fd, uint64_t budget,
                  struct vr_rx_result *out)
{
    return vr_rx_from_fd_prefix(q, s, fd, budget, NULL, 0, -1, out);
}

/* Spec: virtio 1.2 §2.7.13 / §2.8.21, §5.3.6 (console data: receiveq buffers are
 * device-writable; each is returned with the bytes written into it), §5.10.6 (vsock: a
 * packet header in front of the payload, one packet per buffer). */
int vr_rx_from_fd_prefix(struct vr_queue *q, struct vr_scratch *s, int fd, uint64_t budget,
                         const uint8_t *prefix, uint32_t plen, int32_t len_offset,
                         struct vr_rx_result *out)
{
    struct gather g;
    struct iovec riov[VR_MAX_SEGMENTS];
    struct vr_segment tmp[VR_MAX_SEGMENTS];
    struct vr_chain ch;
    uint8_t pbuf[VR_MAX_PREFIX];
    uint64_t read_total = 0;
    uint32_t ndone = 0;
    int eof = 0, starved = 0, drained = 0, error = 0, broken = 0, rc;

    if (plen > VR_MAX_PREFIX || (plen && prefix == NULL) ||
        (len_offset >= 0 && (uint64_t)len_offset + 4 > plen) || len_offset < -1)
        return VR_E_PREFIX;
    while (read_total < budget) {
        uint32_t nent = 0, k, j, rewind_n = 0, rewind_slots = 0;
        uint64_t gathered = 0, limit, n = 0, remaining, want = UINT64_MAX;
        int cnt = 0, known = 0;

        if (ndone + (uint64_t)s->entries_cap > s->done_cap)
            break; /* no room for another round's completions (a racing hostile guest) */
        g.count = 0;
        while (gathered < budget - read_total && gathered < want && !broken &&
               nent < s->entries_cap && ndone + nent + s->entries_cap < s->done_cap) {
            struct vr_entry *e;
            uint32_t np, npre = 0;
            uint64_t skip = plen;
            rc = pop_one(q, &ch, tmp, 0);
            if (rc < 0) {
                broken = -rc;
                break;
            }
            if (rc == 0)
                break;
            np = rx_pieces(&ch, tmp, plen);
            if (g.count && g.count + np > VR_MAX_SEGMENTS) {
                rewind_chains(q, ch.ring_slots, 1);
                break;
            }
            if (ch.writable_bytes <= plen || np > VR_MAX_SEGMENTS) {
                if (nent) {
                    /* Chains gathered before it may stay unfilled and be rewound, counting
                     * back from last_avail_idx: give this one back too, take it first in
                     * the next round (ring/datapath.py does the same). */
                    rewind_chains(q, ch.ring_slots, 1);
                    break;
                }
                add_done(s, &ndone, ch.head, 0, ch.ring_slots); /* back with used_len 0 */
                continue;
            }
            e = &s->entries[nent++];
            e->head = ch.head;
            e->slots = ch.ring_slots;
            e->need = ch.writable_bytes - plen;
            e->prior = 0;
            e->seg_start = (uint32_t)g.count;
            e->nseg = np;
            e->was_pending = 0;
            for (k = ch.nreadable; k < ch.nseg; k++) {
                uint8_t *host = tmp[k].host;
                uint64_t gpa = q->regions[tmp[k].region].gpa + tmp[k].offset, len = tmp[k].len;
                if (skip > 0) { /* the prefix part of this segment */
                    uint64_t m = skip < len ? skip : len;
                    gather_add(&g, host, gpa, m);
                    npre++;
                    skip -= m;
                    if (m == len)
                        continue;
                    host += m;
                    gpa += m;
                    len -= m;
                }
                gather_add(&g, host, gpa, len);
            }
            e->reserved = npre;
            gathered += ch.writable_bytes - plen;
            /* only as many chains as the waiting bytes need (no need to ask when this one
             * chain already holds the whole budget) */
            if (nent == 1 && gathered < budget - read_total)
                want = rx_wanted(fd, &known);
        }
        if (nent == 0) {
            starved = !broken;
            break;
        }
        limit = gathered < budget - read_total ? gathered : budget - read_total;
        { /* the payload pieces of every entry, clipped to `limit` bytes */
            uint64_t left = limit;
            for (k = 0; k < nent && left > 0; k++) {
                const struct vr_entry *e = &s->entries[k];
                for (j = e->reserved; j < e->nseg && left > 0; j++) {
                    riov[cnt] = g.iov[e->seg_start + j];
                    if (riov[cnt].iov_len > left)
                        riov[cnt].iov_len = left;
                    left -= riov[cnt].iov_len;
                    cnt++;
                }
            }
        }
        {
            ssize_t r;
            do
                r = readv(fd, riov, cnt);
            while (r < 0 && errno == EINTR);
            if (r < 0) {
                if (is_again(errno))
                    drained = 1;
                else
                    error = errno;
            } else {
                n = (uint64_t)r;
            }
        }
        if (n == 0 && !drained && !error)
            eof = 1;
        read_total += n;
        remaining = n;
        for (k = 0; k < nent; k++) {
            struct vr_entry *e = &s->entries[k];
            if (remaining > 0) {
                uint64_t got = remaining < e->need ? remaining : e->need, left = got;
                remaining -= got;
                if (plen) { /* the prefix, its length field patched, over the prefix pieces */
                    uint64_t off = 0;
                    memcpy(pbuf, prefix, plen);
                    if (len_offset >= 0) {
                        pbuf[len_offset] = (uint8_t)got;
                        pbuf[len_offset + 1] = (uint8_t)(got >> 8);
                        pbuf[len_offset + 2] = (uint8_t)(got >> 16);
                        pbuf[len_offset + 3] = (uint8_t)(got >> 24);
                    }
                    for (j = 0; j < e->reserved; j++) {
                        const struct iovec *v = &g.iov[e->seg_start + j];
                        memcpy(v->iov_base, pbuf + off, v->iov_len);
                        vr_log_write(q, g.piece[e->seg_start + j].gpa, v->iov_len);
                        off += v->iov_len;
                    }
                }
                add_done(s, &ndone, e->head, (uint32_t)(plen + got), e->slots);
                for (j = e->reserved; j < e->nseg && left > 0; j++) { /* dirty-log the data */
                    const struct vr_gpa_range *p = &g.piece[e->seg_start + j];
                    uint64_t m = p->len < left ? p->len : left;
                    vr_log_write(q, p->gpa, m);
                    left -= m;
                }
            } else {
                rewind_n++;
                rewind_slots += e->slots;
            }
        }
        if (!broken) {
            rewind_chains(q, rewind_slots, rewind_n);
        } else {
            for (k = nent - rewind_n; k < nent; k++)
                add_done(s, &ndone, s->entries[k].head, 0, s->entries[k].slots);
        }
        /* fewer bytes than the buffers offered, or all the fd reported: it has no more now
         * (no second readv just to see EAGAIN) */
        if (n > 0 && !error && (n < limit || (known && n >= want)))
            drained = 1;
        if (eof || drained || error || broken)
            break;
    }
    out->bytes = read_total;
    out->chains = ndone;
    out->eof = eof;
    out->starved = starved;
    out->error = error;
    out->drained = drained;
    out->broken = broken;
    return publish_batch(q, s, ndone, broken, &out->notify);
}

/* ---------------------------------------------------------------------------------------
 * The stream pump (ring/pump.py is the reference).
 */

/* Spec: virtio 1.2 §2.7.7 (used buffer notification); vhost-user VHOST_USER_SET_VRING_CALL. */
int vr_signal_call(const struct vr_queue *q)
{
    uint64_t one = 1;
    ssize_t r;
    if (q->call_fd < 0)
        return 0;
    do
        r = write(q->call_fd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
    return r < 0 && !is_again(errno) ? errno : 0;
}

static int signal_call(struct vr_pump *p, const struct vr_queue *q)
{
    int err = vr_signal_call(q);
    if (err) {
        p->call_errno = err;
        return VR_PUMP_CALL_ERROR;
    }
    return 0;
}

static int rx_step(struct vr_pump *p, uint64_t budget)
{
    struct vr_rx_result *out = &p->rx_out;
    int flags = 0, rc;
    rc = vr_rx_from_fd(p->rx, p->rx_scratch, p->read_fd, budget, out);
    p->bytes_to_guest += out->bytes;
    if (rc < 0)
        return rc;
    if (out->notify)
        flags |= signal_call(p, p->rx);
    if (out->broken)
        flags |= VR_PUMP_RX_BROKEN;
    if (out->error)
        flags |= VR_PUMP_RX_ERROR;
    else if (out->eof)
        flags |= VR_PUMP_RX_EOF;
    else if (out->starved)
        flags |= VR_PUMP_RX_STARVED;
    return flags;
}

int vr_pump_rx(struct vr_pump *p)
{
    if (p->rx == NULL || p->read_fd < 0)
        return 0;
    return rx_step(p, p->rx_budget);
}

/* Consume the guest's notifications (vhost-user "Ring states": the back-end reads the kick
 * eventfd). Its counter is not needed: the ring itself says what is available. */
static int drain_kick(struct vr_pump *p, int fd)
{
    uint64_t count;
    ssize_t r;
    do
        r = read(fd, &count, sizeof count);
    while (r < 0 && errno == EINTR);
    if (r < 0 && !is_again(errno)) {
        p->kick_errno = errno;
        return VR_PUMP_KICK_ERROR;
    }
    return 0;
}

/* Spec: virtio 1.2 §5.3.6 (console port data: transmitq to the host, receiveq from it). */
int vr_pump_tx(struct vr_pump *p, int kick_fd)
{
    struct vr_tx_result *out = &p->tx_out;
    int flags = 0, rc;
    p->ran_rx = 0;
    if (kick_fd >= 0)
        flags = drain_kick(p, kick_fd);
    if (p->tx == NULL || p->write_fd < 0)
        return flags;
    rc = tx_to_fd(p->tx, p->tx_scratch, p->write_fd, p->tx_budget, out, p->tx_zc);
    p->bytes_from_guest += out->bytes;
    if (rc < 0)
        return rc;
    if (out->notify)
        flags |= signal_call(p, p->tx);
    if (p->tx_zc != NULL && p->tx_zc->count > 0)
        flags |= VR_PUMP_TX_DEFERRED;
    if (out->broken)
        flags |= VR_PUMP_TX_BROKEN;
    if (out->error)
        return flags | VR_PUMP_TX_ERROR;
    if (out->blocked)
        return flags | VR_PUMP_TX_BLOCKED;
    if (out->bytes >= p->tx_budget)
        return flags | VR_PUMP_TX_MORE;
    if (out->bytes > 0 && out->bytes <= p->follow_rx_max && p->rx != NULL && p->read_fd >= 0) {
        p->ran_rx = 1;
        rc = rx_step(p, p->follow_rx_max); /* the answer, up to as many bytes */
        if (rc < 0)
            return rc;
        flags |= rc;
    }
    return flags;
}

int vr_pump_tx_release(struct vr_pump *p)
{
    struct vr_zc *z = p->tx_zc;
    struct vr_scratch *s = p->tx_scratch;
    uint32_t n;
    int32_t notify = 0;
    int rc;
    if (z == NULL)
        return 0;
    if (p->tx == NULL || s == NULL) { /* nothing to return them to: only forget them */
        zc_release_all(z, NULL, NULL, NULL, 0);
        return 0;
    }
    n = zc_release_all(z, s->done_head, s->done_len, s->done_slots, s->done_cap);
    rc = publish_batch(p->tx, s, n, 0, &notify);
    if (rc < 0)
        return rc;
    return notify ? signal_call(p, p->tx) : 0;
}

/* Publish to p->tx the kept chains whose bytes the peer has read (vr_pump_tx_stop,
 * vr_pump_tx_resume). */
static int release_read(struct vr_pump *p, struct vr_zc *z)
{
    struct vr_scratch *s = p->tx_scratch;
    int32_t notify = 0;
    uint32_t n = zc_release(z, p->write_fd, s->done_head, s->done_len, s->done_slots,
                            s->done_cap);
    int rc = publish_batch(p->tx, s, n, 0, &notify);
    if (rc < 0)
        return rc;
    return notify ? signal_call(p, p->tx) : 0;
}

/* Spec: vhost-user VHOST_USER_GET_VRING_BASE (the base counts the kept chains consumed: the
 * device still holds them); virtio 1.2 §2.7.8 (a buffer is used once the device is done with
 * it: here once the peer has read its bytes). */
int vr_pump_tx_stop(struct vr_pump *p, struct vr_zc *z)
{
    struct vr_queue *q = p->tx;
    int rc;
    if (q == NULL || p->tx_scratch == NULL || z == NULL || z->fifo == NULL)
        return 0;
    zc_clamp(z);
    if (q->pending_valid && !q->broken &&
        zc_defer(z, q->pending_head, q->pending_slots, z->in_socket) == 0)
        q->pending_valid = 0; /* the caller copies its rest out, after the pipe's bytes */
    rc = release_read(p, z);
    /* the kept chains leave this queue's count; vr_pump_tx_resume adds them to the next */
    q->in_flight = q->in_flight > z->count ? q->in_flight - z->count : 0;
    return rc;
}

int vr_pump_tx_resume(struct vr_pump *p, struct vr_zc *z, int continuing)
{
    struct vr_queue *q = p->tx;
    if (z == NULL || z->count == 0)
        return 0;
    if (!continuing || q == NULL || p->tx_scratch == NULL) {
        zc_release_all(z, NULL, NULL, NULL, 0);
        return 0;
    }
    q->in_flight += z->count;
    return release_read(p, z);
}

void vr_zc_unpin(struct vr_zc *z)
{
    zc_unpin(z);
}
