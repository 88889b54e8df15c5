/*
 * vsock_helper: AF_VSOCK traffic generator and checker run inside the test guest.
 *
 * Host tests start it through the serial command channel (tests/guest/vm.py) and read
 * its line-oriented, machine-readable output. One poll() loop drives every connection,
 * so many concurrent connections cost one process.
 *
 *   vsock_helper listen  -p PORT            -a ACTION [options]
 *   vsock_helper connect -c CID -p PORT     -a ACTION [options]
 *   vsock_helper cid                        print "CID <n>", the guest's own CID
 *                                           (IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock)
 *
 * ACTION (applied to every connection):
 *   send       stream: write -n BYTES of the pattern, shutdown(SHUT_WR), wait for EOF.
 *              seqpacket: send -m MSGS messages (sizes below), shutdown, wait for EOF.
 *   recv       read until EOF, checking the pattern (stream) or every message's size
 *              and content (seqpacket); -n / -m, when given, is the exact expected total.
 *   echo       write back everything read (message by message for seqpacket) until EOF.
 *   roundtrip  send like `send` and read the peer's echo back concurrently, checking it.
 *
 * Options:
 *   -t stream|seqpacket  socket type (default stream)
 *   -k CONNS             connections to accept / open (default 1; listen -k 0 = unlimited)
 *   -n BYTES             stream byte count (default 0; recv: -1 = don't check)
 *   -m MSGS              seqpacket message count (default 0; recv: -1 = don't check)
 *   -z MAXMSG            largest seqpacket message (default 4096)
 *   -s SEED              pattern seed; connection i uses SEED + i (default 0)
 *   -w SECONDS           overall deadline (default 60; 0 = none)
 *   -P                   recv: don't check the pattern (still counts and prints CRC-32)
 *
 * Data pattern (the host side is tests/guest/pattern.py):
 *   stream byte at offset o, seed s:   (o + s) % 251
 *   seqpacket message j, seed s: size 1 + ((s * 2654435761 + j * 40503) mod 2^32) % MAXMSG,
 *   content = the stream pattern from offset 0 with seed s + j.
 *
 * Output lines (stdout, line-buffered):
 *   LISTENING port=P type=T          once listening (listen only)
 *   CONNECTED idx=I                  each connection established
 *   CONN idx=I peer=CID:PORT sent=N rcvd=N msgs_sent=N msgs_rcvd=N crc32_rx=0xXXXXXXXX ok=0|1 [err=...]
 *   DONE conns=K sent=N rcvd=N ok=0|1
 *   ERROR ...                        a fatal error (exit status non-zero)
 * Exit status: 0 every connection ok, 1 a connection failed, 2 usage, 3 deadline, 4 setup.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define PATTERN_PERIOD 251
#define IO_CHUNK 65536
#define MAX_CONNS 4096

enum action { ACT_SEND, ACT_RECV, ACT_ECHO, ACT_ROUNDTRIP };

struct options {
    int listen;
    unsigned cid;
    unsigned port;
    int type;
    long conns;
    long long bytes;
    long msgs;
    long maxmsg;
    unsigned seed;
    long deadline_s;
    int check_pattern;
    enum action action;
};

struct conn {
    int fd;
    int idx;
    unsigned seed;
    unsigned peer_cid, peer_port;
    unsigned long long sent, rcvd;
    long msgs_sent, msgs_rcvd;
    uint32_t crc_rx;
    int wr_shut;     /* our sending is finished (shutdown(SHUT_WR) done) */
    int eof;         /* peer finished sending */
    int done;
    int ok;
    char err[96];
    /* echo: bytes read but not yet written back (stream) / one message (seqpacket) */
    unsigned char *pend;
    size_t pend_len, pend_off;
    int pend_is_msg;
    /* roundtrip seqpacket: a message is outstanding */
    int awaiting_reply;
};

static const struct options *opt;
static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* Running CRC-32 (IEEE, same as zlib.crc32): start with 0. */
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void pattern_fill(unsigned char *buf, size_t n, unsigned long long offset, unsigned seed)
{
    unsigned v = (unsigned)((offset + seed) % PATTERN_PERIOD);
    for (size_t i = 0; i < n; i++) {
        buf[i] = (unsigned char)v;
        if (++v == PATTERN_PERIOD)
            v = 0;
    }
}

/* Index of the first byte that differs from the pattern, or -1. */
static long pattern_check(const unsigned char *buf, size_t n, unsigned long long offset, unsigned seed)
{
    unsigned v = (unsigned)((offset + seed) % PATTERN_PERIOD);
    for (size_t i = 0; i < n; i++) {
        if (buf[i] != v)
            return (long)i;
        if (++v == PATTERN_PERIOD)
            v = 0;
    }
    return -1;
}

static size_t msg_size(unsigned seed, long j)
{
    uint32_t h = (uint32_t)seed * 2654435761u + (uint32_t)j * 40503u;
    return 1 + h % (uint32_t)opt->maxmsg;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    if (!c->ok)
        return;
    c->ok = 0;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    for (char *p = c->err; *p; p++)
        if (*p == ' ')
            *p = '_';
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void finish(struct conn *c)
{
    if (c->done)
        return;
    c->done = 1;
    if (c->ok && opt->action == ACT_RECV) {
        if (opt->type == SOCK_STREAM && opt->bytes >= 0 && c->rcvd != (unsigned long long)opt->bytes)
            fail(c, "expected %lld bytes got %llu", opt->bytes, c->rcvd);
        if (opt->type == SOCK_SEQPACKET && opt->msgs >= 0 && c->msgs_rcvd != opt->msgs)
            fail(c, "expected %ld msgs got %ld", opt->msgs, c->msgs_rcvd);
    }
    if (c->ok && opt->action == ACT_ROUNDTRIP) {
        if (opt->type == SOCK_STREAM && c->rcvd != (unsigned long long)opt->bytes)
            fail(c, "echoed %llu of %lld bytes", c->rcvd, opt->bytes);
        if (opt->type == SOCK_SEQPACKET && c->msgs_rcvd != opt->msgs)
            fail(c, "echoed %ld of %ld msgs", c->msgs_rcvd, opt->msgs);
    }
    printf("CONN idx=%d peer=%u:%u sent=%llu rcvd=%llu msgs_sent=%ld msgs_rcvd=%ld crc32_rx=0x%08x ok=%d%s%s\n",
           c->idx, c->peer_cid, c->peer_port, c->sent, c->rcvd, c->msgs_sent, c->msgs_rcvd,
           c->crc_rx, c->ok, c->ok ? "" : " err=", c->ok ? "" : c->err);
    close(c->fd);
    c->fd = -1;
    free(c->pend);
    c->pend = NULL;
}

static void shut_wr(struct conn *c)
{
    if (!c->wr_shut) {
        shutdown(c->fd, SHUT_WR);
        c->wr_shut = 1;
    }
}

/* Account for received bytes (stream) or one message (seqpacket) and check them. */
static void check_rx(struct conn *c, const unsigned char *buf, size_t n)
{
    c->crc_rx = crc_update(c->crc_rx, buf, n);
    if (opt->type == SOCK_STREAM) {
        if (opt->check_pattern && opt->action != ACT_ECHO) {
            long bad = pattern_check(buf, n, c->rcvd, c->seed);
            if (bad >= 0)
                fail(c, "pattern mismatch at byte %llu", c->rcvd + bad);
        }
        c->rcvd += n;
        return;
    }
    if (opt->check_pattern && opt->action != ACT_ECHO) {
        size_t want = msg_size(c->seed, c->msgs_rcvd);
        if (n != want)
            fail(c, "msg %ld size %zu expected %zu", c->msgs_rcvd, n, want);
        else if (pattern_check(buf, n, 0, c->seed + (unsigned)c->msgs_rcvd) >= 0)
            fail(c, "msg %ld content mismatch", c->msgs_rcvd);
    }
    c->rcvd += n;
    c->msgs_rcvd++;
}

static unsigned char iobuf[IO_CHUNK + 1];

/* Readable: returns after one read (the poll loop comes back while data remains). */
static void on_readable(struct conn *c)
{
    if (opt->action == ACT_ECHO && c->pend_len > c->pend_off)
        return; /* backpressure: write the pending echo first */
    ssize_t n;
    if (opt->type == SOCK_SEQPACKET) {
        n = recv(c->fd, iobuf, opt->maxmsg + 1, MSG_TRUNC);
        if (n > opt->maxmsg) {
            fail(c, "msg %ld truncated (%zd bytes)", c->msgs_rcvd, n);
            n = opt->maxmsg;
        }
    } else {
        n = read(c->fd, iobuf, IO_CHUNK);
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        fail(c, "read: %s", strerror(errno));
        c->eof = 1;
        finish(c);
        return;
    }
    if (n == 0) {
        c->eof = 1;
        if (opt->action == ACT_ECHO || opt->action == ACT_RECV)
            shut_wr(c);
        return;
    }
    check_rx(c, iobuf, (size_t)n);
    if (opt->action == ACT_ROUNDTRIP && opt->type == SOCK_SEQPACKET)
        c->awaiting_reply = 0;
    if (opt->action == ACT_ECHO) {
        c->pend = realloc(c->pend, (size_t)n);
        memcpy(c->pend, iobuf, (size_t)n);
        c->pend_len = (size_t)n;
        c->pend_off = 0;
        c->pend_is_msg = opt->type == SOCK_SEQPACKET;
    }
}

static void on_writable(struct conn *c)
{
    ssize_t n;
    if (opt->action == ACT_ECHO) {
        if (c->pend_len <= c->pend_off)
            return;
        n = send(c->fd, c->pend + c->pend_off, c->pend_len - c->pend_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                fail(c, "write: %s", strerror(errno));
                finish(c);
            }
            return;
        }
        c->sent += (unsigned long long)n;
        if (c->pend_is_msg) {
            if ((size_t)n != c->pend_len)
                fail(c, "echo msg short write %zd", n);
            c->msgs_sent++;
            c->pend_off = c->pend_len;
        } else {
            c->pend_off += (size_t)n;
        }
        return;
    }
    /* send / roundtrip */
    if (c->wr_shut)
        return;
    if (opt->type == SOCK_STREAM) {
        unsigned long long left = (unsigned long long)opt->bytes - c->sent;
        if (left == 0) {
            shut_wr(c);
            return;
        }
        size_t chunk = left < IO_CHUNK ? (size_t)left : IO_CHUNK;
        pattern_fill(iobuf, chunk, c->sent, c->seed);
        n = send(c->fd, iobuf, chunk, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                fail(c, "write: %s", strerror(errno));
                finish(c);
            }
            return;
        }
        c->sent += (unsigned long long)n;
        if (c->sent == (unsigned long long)opt->bytes)
            shut_wr(c);
        return;
    }
    if (c->msgs_sent >= opt->msgs) {
        shut_wr(c);
        return;
    }
    if (opt->action == ACT_ROUNDTRIP && c->awaiting_reply)
        return;
    size_t size = msg_size(c->seed, c->msgs_sent);
    pattern_fill(iobuf, size, 0, c->seed + (unsigned)c->msgs_sent);
    n = send(c->fd, iobuf, size, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            fail(c, "send msg %ld: %s", c->msgs_sent, strerror(errno));
            finish(c);
        }
        return;
    }
    if ((size_t)n != size)
        fail(c, "msg %ld short send %zd of %zu", c->msgs_sent, n, size);
    c->sent += (unsigned long long)n;
    c->msgs_sent++;
    if (opt->action == ACT_ROUNDTRIP)
        c->awaiting_reply = 1;
    if (c->msgs_sent >= opt->msgs && opt->action == ACT_SEND)
        shut_wr(c);
}

static short wanted_events(const struct conn *c)
{
    short ev = 0;
    switch (opt->action) {
    case ACT_SEND:
        ev = POLLIN; /* EOF (or stray data) from the peer */
        if (!c->wr_shut)
            ev |= POLLOUT;
        break;
    case ACT_RECV:
        ev = POLLIN;
        break;
    case ACT_ECHO:
        ev = c->pend_len > c->pend_off ? POLLOUT : POLLIN;
        break;
    case ACT_ROUNDTRIP:
        ev = POLLIN;
        if (!c->wr_shut && !(opt->type == SOCK_SEQPACKET && c->awaiting_reply))
            ev |= POLLOUT;
        break;
    }
    return ev;
}

static void after_io(struct conn *c)
{
    if (c->done)
        return;
    if (opt->action == ACT_ROUNDTRIP && opt->type == SOCK_SEQPACKET && !c->wr_shut &&
        c->msgs_sent >= opt->msgs && !c->awaiting_reply)
        shut_wr(c);
    if (c->eof) {
        if (opt->action == ACT_ECHO && c->pend_len > c->pend_off)
            return;
        if (opt->action == ACT_SEND && !c->wr_shut) {
            fail(c, "peer closed after %llu bytes sent", c->sent);
        }
        finish(c);
    }
}

static int make_socket(void)
{
    int fd = socket(AF_VSOCK, opt->type | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        printf("ERROR socket(AF_VSOCK): %s\n", strerror(errno));
        exit(4);
    }
    return fd;
}

static struct conn *new_conn(struct conn *conns, int *nconns, int fd, const struct sockaddr_vm *peer)
{
    struct conn *c = &conns[*nconns];
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->idx = *nconns;
    c->seed = opt->seed + (unsigned)*nconns;
    c->peer_cid = peer->svm_cid;
    c->peer_port = peer->svm_port;
    c->ok = 1;
    (*nconns)++;
    set_nonblock(fd);
    printf("CONNECTED idx=%d peer=%u:%u\n", c->idx, c->peer_cid, c->peer_port);
    return c;
}

static void usage(void)
{
    fprintf(stderr, "usage: vsock_helper listen|connect [-c CID] -p PORT -a send|recv|echo|roundtrip\n"
                    "       [-t stream|seqpacket] [-k CONNS] [-n BYTES] [-m MSGS] [-z MAXMSG]\n"
                    "       [-s SEED] [-w SECONDS] [-P]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static struct options o = {
        .cid = VMADDR_CID_HOST, .port = 0, .type = SOCK_STREAM, .conns = 1, .bytes = 0,
        .msgs = 0, .maxmsg = 4096, .seed = 0, .deadline_s = 60, .check_pattern = 1,
        .action = ACT_RECV,
    };
    int have_action = 0, have_port = 0, have_bytes = 0, have_msgs = 0;
    opt = &o;
    setvbuf(stdout, NULL, _IOLBF, 0);
    crc_init();

    if (argc < 2)
        usage();
    if (!strcmp(argv[1], "cid")) {
        unsigned int cid = 0;
        int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
        if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
            printf("ERROR /dev/vsock: %s\n", strerror(errno));
            return 4;
        }
        printf("CID %u\n", cid);
        return 0;
    }
    if (!strcmp(argv[1], "listen"))
        o.listen = 1;
    else if (strcmp(argv[1], "connect"))
        usage();
    optind = 2;
    int ch;
    while ((ch = getopt(argc, argv, "c:p:t:k:n:m:z:s:w:a:P")) != -1) {
        switch (ch) {
        case 'c': o.cid = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'p': o.port = (unsigned)strtoul(optarg, NULL, 0); have_port = 1; break;
        case 't':
            if (!strcmp(optarg, "stream")) o.type = SOCK_STREAM;
            else if (!strcmp(optarg, "seqpacket")) o.type = SOCK_SEQPACKET;
            else usage();
            break;
        case 'k': o.conns = strtol(optarg, NULL, 0); break;
        case 'n': o.bytes = strtoll(optarg, NULL, 0); have_bytes = 1; break;
        case 'm': o.msgs = strtol(optarg, NULL, 0); have_msgs = 1; break;
        case 'z': o.maxmsg = strtol(optarg, NULL, 0); break;
        case 's': o.seed = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'w': o.deadline_s = strtol(optarg, NULL, 0); break;
        case 'P': o.check_pattern = 0; break;
        case 'a':
            have_action = 1;
            if (!strcmp(optarg, "send")) o.action = ACT_SEND;
            else if (!strcmp(optarg, "recv")) o.action = ACT_RECV;
            else if (!strcmp(optarg, "echo")) o.action = ACT_ECHO;
            else if (!strcmp(optarg, "roundtrip")) o.action = ACT_ROUNDTRIP;
            else usage();
            break;
        default: usage();
        }
    }
    if (!have_action || !have_port || o.maxmsg < 1 || o.maxmsg > IO_CHUNK ||
        o.conns < 0 || o.conns > MAX_CONNS || (!o.listen && o.conns == 0))
        usage();
    if (o.action == ACT_RECV) {
        if (!have_bytes) o.bytes = -1;
        if (!have_msgs) o.msgs = -1;
    }
    if ((o.action == ACT_SEND || o.action == ACT_ROUNDTRIP) && (o.bytes < 0 || o.msgs < 0))
        usage();

    struct conn *conns = calloc(MAX_CONNS, sizeof *conns);
    struct pollfd *pfds = calloc(MAX_CONNS + 1, sizeof *pfds);
    int nconns = 0, lfd = -1;
    long target = o.conns == 0 ? MAX_CONNS : o.conns;
    double deadline = o.deadline_s > 0 ? now_s() + (double)o.deadline_s : 0;

    if (o.listen) {
        struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = o.port };
        lfd = make_socket();
        if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 128) < 0) {
            printf("ERROR bind/listen port %u: %s\n", o.port, strerror(errno));
            return 4;
        }
        set_nonblock(lfd);
        printf("LISTENING port=%u type=%s\n", o.port, o.type == SOCK_STREAM ? "stream" : "seqpacket");
    } else {
        for (long i = 0; i < target; i++) {
            struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = o.cid, .svm_port = o.port };
            int fd = make_socket();
            if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                printf("ERROR connect %u:%u (conn %ld): %s\n", o.cid, o.port, i, strerror(errno));
                return 4;
            }
            new_conn(conns, &nconns, fd, &sa);
        }
    }

    for (;;) {
        int npfd = 0, active = 0;
        int map[MAX_CONNS + 1];
        if (lfd >= 0 && nconns < target) {
            pfds[npfd].fd = lfd;
            pfds[npfd].events = POLLIN;
            map[npfd++] = -1;
        }
        for (int i = 0; i < nconns; i++) {
            if (conns[i].done)
                continue;
            active++;
            pfds[npfd].fd = conns[i].fd;
            pfds[npfd].events = wanted_events(&conns[i]);
            map[npfd++] = i;
        }
        if (active == 0 && (lfd < 0 || nconns >= target))
            break;
        int timeout_ms = -1;
        if (deadline) {
            double left = deadline - now_s();
            if (left <= 0) {
                printf("ERROR deadline of %ld s reached (%d of %ld connections, %d active)\n",
                       o.deadline_s, nconns, target, active);
                for (int i = 0; i < nconns; i++)
                    if (!conns[i].done) {
                        fail(&conns[i], "deadline");
                        finish(&conns[i]);
                    }
                return 3;
            }
            timeout_ms = (int)(left * 1000) + 1;
        }
        int r = poll(pfds, (nfds_t)npfd, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            printf("ERROR poll: %s\n", strerror(errno));
            return 4;
        }
        for (int p = 0; p < npfd; p++) {
            short re = pfds[p].revents;
            if (!re)
                continue;
            if (map[p] < 0) {
                struct sockaddr_vm peer;
                socklen_t len = sizeof peer;
                int fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
                if (fd >= 0)
                    new_conn(conns, &nconns, fd, &peer);
                continue;
            }
            struct conn *c = &conns[map[p]];
            if (re & (POLLIN | POLLHUP | POLLERR))
                on_readable(c);
            if (!c->done && (re & POLLOUT))
                on_writable(c);
            if (!c->done && (re & POLLERR) && !(re & POLLIN)) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                fail(c, "socket error: %s", strerror(err));
                c->eof = 1;
            }
            after_io(c);
        }
    }

    unsigned long long sent = 0, rcvd = 0;
    int all_ok = 1;
    for (int i = 0; i < nconns; i++) {
        sent += conns[i].sent;
        rcvd += conns[i].rcvd;
        all_ok &= conns[i].ok;
    }
    printf("DONE conns=%d sent=%llu rcvd=%llu ok=%d\n", nconns, sent, rcvd, all_ok);
    return all_ok ? 0 : 1;
}
