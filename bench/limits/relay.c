/* The machine's own ceiling for a host->guest vsock stream through ANY back-end: three
 * processes on the CPUs given, doing only what the data path must do, in C, with no
 * virtqueue, no vhost-user and no Python:
 *   writer  (the host peer)  write()s CHUNK-byte buffers into an AF_UNIX stream socket;
 *   relay   (the back-end)   waits in epoll for the socket and the reader's credit eventfd,
 *                            readv()s the socket straight into the reader's posted 4 KiB
 *                            buffers in shared memory (never beyond the reader's credit),
 *                            writes each buffer's 44-byte header (its len patched), publishes
 *                            them and signals the reader's eventfd when it asked for it;
 *   reader  (the guest)      takes each buffer, checks every payload byte (the host source's
 *                            0x5a, as bench/limits/vsock_guest.c does), posts it again, and
 *                            sends a credit update (store + eventfd write) the way Linux does
 *                            (virtio_transport_stream_do_dequeue: once the peer's view of its
 *                            free space falls under 64 KiB), asking for a signal before it
 *                            sleeps.
 * So it has the three copies (writer into the socket, relay into the buffers, reader's pass)
 * and the three processes of the real path, the same buffer size (Linux 6.1 posts 4 KiB RX
 * buffers), the same window (WINDOW bytes, Linux's default 256 KiB) and the same wake-ups per
 * window (one credit eventfd, one readv, one signal), and nothing else. What vmchannel's
 * back-end adds on top of it is its own cost; the ratio of this relay to raw AF_UNIX at the
 * same chunk size is what the machine allows for that shape of path.
 *
 * usage: relay CHUNK SECONDS WINDOW WRITER_CPU RELAY_CPU READER_CPU
 * prints one JSON object: bytes (checked at the reader), seconds (first write to the
 * reader's last byte), bytes_per_s, windows (credit updates sent), signals. The reader
 * exits 3 on a wrong byte and 4 on bytes beyond the credit it gave. */
#include "common.h"
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>

#define SLOTS 128        /* the RX queue's size (QEMU's vhost-vsock: 128) */
#define BUF 4096         /* VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE */
#define HDR 44           /* struct virtio_vsock_hdr */
#define LEN_OFFSET 24    /* its le32 len */
#define UPDATE_BELOW (64 * 1024) /* VIRTIO_VSOCK_MAX_PKT_BUF_SIZE */

struct shared {
    _Atomic uint32_t filled;         /* buffers the relay published (a running count) */
    _Atomic uint32_t consumed;       /* buffers the reader took and posted again */
    _Atomic uint32_t fwd_cnt;        /* payload bytes the reader advertised as consumed */
    _Atomic uint32_t tx_cnt;         /* payload bytes the relay published */
    _Atomic int reader_waiting;      /* the reader asked for a signal */
    _Atomic int eof;                 /* the relay saw the writer's EOF */
    _Atomic uint64_t signals, windows;
    unsigned char hdr[SLOTS][HDR];
    unsigned char buf[SLOTS][BUF];
};

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = v & 0xff, p[1] = (v >> 8) & 0xff, p[2] = (v >> 16) & 0xff, p[3] = v >> 24;
}

static uint32_t get_u32(const unsigned char *p)
{
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    write_all(fd, &one, sizeof one);
}

static void relay(struct shared *sh, int sock, int kick, int call, uint32_t window)
{
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, ready[2];
    ev.data.fd = kick;
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, kick, &ev) < 0)
        die("epoll");
    int watching = 0;
    uint32_t tx_cnt = 0, filled = 0;
    unsigned char template[HDR];
    memset(template, 0, sizeof template); /* src/dst cid and ports, type, op: fixed */
    template[0] = 2;
    for (;;) {
        uint32_t peer_fwd = atomic_load_explicit(&sh->fwd_cnt, memory_order_acquire);
        uint32_t consumed = atomic_load_explicit(&sh->consumed, memory_order_acquire);
        uint32_t credit = window - (tx_cnt - peer_fwd);
        uint32_t posted = SLOTS - (filled - consumed);
        int want = credit > 0 && posted > 0;
        if (want != watching) { /* read interest only while the reader can take bytes */
            ev.data.fd = sock;
            if (epoll_ctl(ep, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, sock, &ev) < 0)
                die("epoll_ctl");
            watching = want;
        }
        int n = epoll_wait(ep, ready, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        int readable = 0;
        for (int i = 0; i < n; i++) {
            if (ready[i].data.fd == kick) {
                uint64_t v;
                if (read(kick, &v, sizeof v) < 0 && errno != EAGAIN)
                    die("read kick");
            } else {
                readable = 1;
            }
        }
        if (!readable)
            continue;
        peer_fwd = atomic_load_explicit(&sh->fwd_cnt, memory_order_acquire);
        consumed = atomic_load_explicit(&sh->consumed, memory_order_acquire);
        credit = window - (tx_cnt - peer_fwd);
        posted = SLOTS - (filled - consumed);
        if (credit == 0 || posted == 0)
            continue;
        struct iovec iov[SLOTS];
        unsigned k = 0;
        for (uint32_t left = credit; k < posted && left; k++) {
            unsigned slot = (filled + k) % SLOTS;
            iov[k].iov_base = sh->buf[slot];
            iov[k].iov_len = left < BUF ? left : BUF;
            left -= iov[k].iov_len;
        }
        ssize_t got = readv(sock, iov, (int)k);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("readv");
        }
        if (got == 0) {
            atomic_store_explicit(&sh->eof, 1, memory_order_release);
            signal_fd(call);
            return;
        }
        size_t rest = (size_t)got;
        unsigned used = 0;
        while (rest) { /* one packet per buffer: its header, len patched */
            unsigned slot = (filled + used) % SLOTS;
            uint32_t len = rest < iov[used].iov_len ? (uint32_t)rest : (uint32_t)iov[used].iov_len;
            memcpy(sh->hdr[slot], template, HDR);
            put_u32(sh->hdr[slot] + LEN_OFFSET, len);
            rest -= len;
            used++;
        }
        filled += used;
        tx_cnt += (uint32_t)got;
        atomic_store_explicit(&sh->tx_cnt, tx_cnt, memory_order_relaxed);
        atomic_store_explicit(&sh->filled, filled, memory_order_release);
        if (atomic_exchange_explicit(&sh->reader_waiting, 0, memory_order_acq_rel)) {
            atomic_fetch_add_explicit(&sh->signals, 1, memory_order_relaxed);
            signal_fd(call);
        }
    }
}

static uint64_t reader(struct shared *sh, int kick, int call, uint32_t window)
{
    static unsigned char expect[BUF];
    memset(expect, 0x5a, sizeof expect);
    uint32_t consumed = 0, fwd = 0, advertised = 0;
    uint64_t total = 0;
    for (;;) {
        uint32_t filled = atomic_load_explicit(&sh->filled, memory_order_acquire);
        /* the relay's credit came from a fwd_cnt no newer than ours: never beyond it */
        uint32_t sent = atomic_load_explicit(&sh->tx_cnt, memory_order_relaxed);
        if (sent - advertised > window) {
            fprintf(stderr, "relay: %u bytes beyond the last credit update, window %u\n",
                    sent - advertised, window);
            exit(4);
        }
        while (consumed != filled) {
            unsigned slot = consumed % SLOTS;
            uint32_t len = get_u32(sh->hdr[slot] + LEN_OFFSET);
            if (len > BUF || memcmp(sh->buf[slot], expect, len) != 0) {
                fprintf(stderr, "relay: bad payload in buffer %u\n", slot);
                exit(3);
            }
            total += len;
            fwd += len;
            consumed++;
            atomic_store_explicit(&sh->consumed, consumed, memory_order_release);
            if (window - (fwd - advertised) < UPDATE_BELOW) { /* Linux's credit update */
                advertised = fwd;
                atomic_store_explicit(&sh->fwd_cnt, fwd, memory_order_release);
                atomic_fetch_add_explicit(&sh->windows, 1, memory_order_relaxed);
                signal_fd(kick);
            }
        }
        if (atomic_load_explicit(&sh->eof, memory_order_acquire) &&
            consumed == atomic_load_explicit(&sh->filled, memory_order_acquire))
            return total;
        atomic_store_explicit(&sh->reader_waiting, 1, memory_order_release);
        if (consumed != atomic_load_explicit(&sh->filled, memory_order_acquire) ||
            atomic_load_explicit(&sh->eof, memory_order_acquire))
            continue; /* published meanwhile: no sleep */
        uint64_t v;
        if (read(call, &v, sizeof v) < 0 && errno != EINTR)
            die("read call");
    }
}

/* A forked process's start: pinned, the parent's ends closed, and its own alarm (alarms
 * are not inherited across fork), so a process that failed never leaves the others blocked
 * for ever. */
static void enter_child(int cpu, unsigned limit_s, int close_a, int close_b)
{
    alarm(limit_s);
    close(close_a);
    close(close_b);
    pin(cpu);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: relay CHUNK SECONDS WINDOW WRITER_CPU RELAY_CPU READER_CPU\n");
        return 2;
    }
    size_t chunk = strtoul(argv[1], NULL, 0);
    double seconds = atof(argv[2]);
    uint32_t window = (uint32_t)strtoul(argv[3], NULL, 0);
    int wcpu = atoi(argv[4]), rcpu = atoi(argv[5]), gcpu = atoi(argv[6]);
    if (chunk == 0 || window < UPDATE_BELOW) {
        fprintf(stderr, "relay: CHUNK must be > 0 and WINDOW >= %d\n", UPDATE_BELOW);
        return 2;
    }
    struct shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int sv[2], report[2];
    int kick = eventfd(0, EFD_NONBLOCK), call = eventfd(0, 0);
    if (sh == MAP_FAILED || kick < 0 || call < 0)
        die("mmap/eventfd");
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 || pipe(report) < 0)
        die("socketpair");
    unsigned limit_s = (unsigned)seconds + 30;
    alarm(limit_s);
    pid_t relay_pid = fork();
    if (relay_pid < 0)
        die("fork");
    if (relay_pid == 0) {
        enter_child(rcpu, limit_s, sv[0], report[0]);
        if (fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK) < 0)
            die("fcntl");
        relay(sh, sv[1], kick, call, window);
        _exit(0);
    }
    pid_t reader_pid = fork();
    if (reader_pid < 0)
        die("fork");
    if (reader_pid == 0) {
        enter_child(gcpu, limit_s, sv[0], report[0]);
        close(sv[1]);
        uint64_t total = reader(sh, kick, call, window);
        uint64_t end = now_ns();
        write_all(report[1], &total, sizeof total);
        write_all(report[1], &end, sizeof end);
        _exit(0);
    }
    close(sv[1]);
    close(report[1]);
    pin(wcpu);
    char *buf = malloc(chunk);
    if (!buf)
        die("malloc");
    memset(buf, 0x5a, chunk);
    uint64_t start = now_ns(), stop = start + (uint64_t)(seconds * 1e9);
    do {
        for (int k = 0; k < 16; k++)
            write_all(sv[0], buf, chunk);
    } while (now_ns() < stop);
    close(sv[0]);
    uint64_t total = 0, end = 0;
    if (!read_all(report[0], &total, sizeof total) || !read_all(report[0], &end, sizeof end))
        die("reader report");
    waitpid(reader_pid, NULL, 0);
    waitpid(relay_pid, NULL, 0);
    double secs = (double)(end - start) / 1e9;
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"bytes_per_s\": %.1f, \"windows\": %llu, "
           "\"signals\": %llu}\n",
           (unsigned long long)total, secs, total / secs,
           (unsigned long long)atomic_load(&sh->windows),
           (unsigned long long)atomic_load(&sh->signals));
    return 0;
}
