/* The host-side peer of the end-to-end scenarios: connects to the back-end's host UNIX
 * sockets (console ports, vsock) and sinks, sources or echoes bytes, in C so the peer costs
 * as little as the raw limit's own reader/writer does.
 *
 * usage: peer sink|source|echo CHUNK CPU SPEC...
 *   SPEC = PATH | stall:PATH (connect, never read or write) | vsock:PORT:PATH (hybrid vsock:
 *          write "CONNECT PORT\n", wait for the "OK ...\n" line first)
 * After every connection is up it prints "READY\n"; on SIGTERM/SIGINT (or when every
 * connection closed) it prints one JSON line {"bytes": [per connection]} and exits.
 * sink reads into 256 KiB; source writes CHUNK-byte buffers (non-blocking, epoll);
 * echo reads up to CHUNK bytes and writes them back.
 * A sink checks its vsock: connections against the guest->host stream pattern (byte o = the
 * xorshift32 sequence's byte o % 4093, as bench/limits/vsock_guest.c and bench/vsock_guest.py
 * write it): every byte of a connection's first FULL_CHECK_BYTES, then a sample of
 * SAMPLE_BYTES at every SAMPLE_STRIDE-aligned stream offset and at the end of each read, so
 * a lost, repeated, reordered or stale run of bytes still fails the run, but the measured
 * runs do not pay a full compare the raw limit's reader does not do (it cost about 0.05 of
 * the guest->host ratio). The first mismatch is reported in the JSON line as
 * "mismatch": [connection, stream offset] and the exit status is 4. */
#include "common.h"
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>

#define PATTERN_PERIOD 4093u
#define SINK_BUF (256 * 1024)

/* The guest->host stream pattern, long enough that any read's expected bytes are one
 * contiguous run from offset o % PATTERN_PERIOD (bench/limits/vsock_guest.c writes it). */
static uint8_t stream_ref[PATTERN_PERIOD + SINK_BUF];

static void make_stream_ref(void)
{
    uint32_t x = 0x9e3779b9u, j = 0;
    while (j < PATTERN_PERIOD) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        stream_ref[j++] = (uint8_t)(x >> 24);
    }
    while (j < sizeof stream_ref) {
        stream_ref[j] = stream_ref[j - PATTERN_PERIOD];
        j++;
    }
}

#define FULL_CHECK_BYTES (32ull << 20)
#define SAMPLE_STRIDE 512u
#define SAMPLE_BYTES 8u /* one 8-byte load (pattern_mismatch) */

/* Offset of the first byte of buf[0..n) that differs from the pattern at stream offset `at`,
 * comparing every byte of it, or -1. */
static long long pattern_mismatch_full(const char *buf, size_t n, uint64_t at)
{
    for (size_t done = 0; done < n; done += SINK_BUF) {
        size_t m = n - done < SINK_BUF ? n - done : SINK_BUF;
        const uint8_t *want = stream_ref + (at + done) % PATTERN_PERIOD;
        if (memcmp(buf + done, want, m) != 0)
            for (size_t k = 0;; k++)
                if ((uint8_t)buf[done + k] != want[k])
                    return (long long)(at + done + k);
    }
    return -1;
}

/* The sink's check of one read (see the header comment): every byte while the stream is in
 * its first FULL_CHECK_BYTES, then samples. Returns the stream offset of a wrong byte or
 * -1. */
static long long pattern_mismatch(const char *buf, size_t n, uint64_t at)
{
    if (at < FULL_CHECK_BYTES)
        return pattern_mismatch_full(buf, n, at);
    size_t first = (size_t)(-at % SAMPLE_STRIDE); /* the first stride-aligned offset */
    /* The samples' pattern phase advances by SAMPLE_STRIDE mod PATTERN_PERIOD each: kept
     * incrementally, with an 8-byte load per whole sample, so a sample costs a compare, not
     * a 64-bit modulo and a memcmp call (together about 0.07 of the guest->host row's
     * samples, a cost the raw limit's reader does not have). */
    uint32_t phase = (uint32_t)((at + first) % PATTERN_PERIOD);
    for (size_t k = first; k < n; k += SAMPLE_STRIDE) {
        if (n - k >= SAMPLE_BYTES) {
            uint64_t got, want;
            memcpy(&got, buf + k, SAMPLE_BYTES);
            memcpy(&want, stream_ref + phase, SAMPLE_BYTES);
            if (got != want)
                return pattern_mismatch_full(buf + k, SAMPLE_BYTES, at + k);
        } else {
            long long bad = pattern_mismatch_full(buf + k, n - k, at + k);
            if (bad >= 0)
                return bad;
        }
        phase += SAMPLE_STRIDE % PATTERN_PERIOD;
        if (phase >= PATTERN_PERIOD)
            phase -= PATTERN_PERIOD;
    }
    size_t tail = n < SAMPLE_BYTES ? n : SAMPLE_BYTES;
    return pattern_mismatch_full(buf + n - tail, tail, at + n - tail);
}

static volatile sig_atomic_t stopping;
static void on_signal(int sig) { (void)sig; stopping = 1; }

static int connect_path(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "path too long: %s\n", path);
        exit(2);
    }
    strcpy(addr.sun_path, path);
    uint64_t deadline = now_ns() + 20ull * 1000000000ull;
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            return fd;
        close(fd);
        if (now_ns() > deadline)
            die(path);
        usleep(2000);
    }
}

static void vsock_connect(int fd, const char *port)
{
    char line[64];
    int n = snprintf(line, sizeof line, "CONNECT %s\n", port);
    write_all(fd, line, (size_t)n);
    size_t got = 0;
    for (;;) { /* read the reply line byte by byte: nothing of the stream may be eaten */
        if (got + 1 >= sizeof line || !read_all(fd, line + got, 1)) {
            fprintf(stderr, "vsock CONNECT %s: no OK line\n", port);
            exit(3);
        }
        if (line[got++] == '\n')
            break;
    }
    if (strncmp(line, "OK ", 3) != 0) {
        fprintf(stderr, "vsock CONNECT %s: %.*s\n", port, (int)got, line);
        exit(3);
    }
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: peer sink|source|echo CHUNK CPU SPEC...\n");
        return 2;
    }
    const char *mode = argv[1];
    size_t chunk = strtoul(argv[2], NULL, 0);
    pin(atoi(argv[3]));
    int nconn = argc - 4;
    int *fds = calloc((size_t)nconn, sizeof *fds);
    int *stalled = calloc((size_t)nconn, sizeof *stalled);
    int *checked = calloc((size_t)nconn, sizeof *checked); /* vsock: guest->host pattern */
    int bad_conn = -1;
    long long bad_at = -1;
    uint64_t *bytes = calloc((size_t)nconn, sizeof *bytes);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < nconn; i++) {
        char *spec = argv[4 + i];
        if (strncmp(spec, "stall:", 6) == 0) {
            stalled[i] = 1;
            spec += 6;
        }
        if (strncmp(spec, "vsock:", 6) == 0) {
            char *port = spec + 6, *colon = strchr(port, ':');
            if (!colon) {
                fprintf(stderr, "bad spec %s\n", spec);
                return 2;
            }
            *colon = 0;
            checked[i] = strcmp(mode, "sink") == 0;
            fds[i] = connect_path(colon + 1);
            vsock_connect(fds[i], port);
        } else {
            fds[i] = connect_path(spec);
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int src = strcmp(mode, "source") == 0, echo = strcmp(mode, "echo") == 0;
    int live = 0;
    for (int i = 0; i < nconn; i++) {
        if (stalled[i])
            continue;
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = src ? EPOLLOUT : EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
            die("epoll_ctl");
        live++;
    }
    printf("READY\n");
    fflush(stdout);
    size_t bufsize = chunk > SINK_BUF ? chunk : SINK_BUF;
    make_stream_ref();
    char *buf = malloc(bufsize);
    memset(buf, 0x5a, bufsize);
    struct epoll_event events[256];
    while (!stopping && live > 0) {
        int n = epoll_wait(ep, events, 256, 200);
        for (int k = 0; k < n; k++) {
            int i = (int)events[k].data.u32, fd = fds[i];
            if (src) {
                for (;;) {
                    ssize_t w = write(fd, buf, chunk);
                    if (w < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                            break;
                        epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                        live--;
                        break;
                    }
                    bytes[i] += (uint64_t)w;
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf, echo ? chunk : bufsize);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    live--;
                    break;
                }
                if (r < 0)
                    break;
                if (checked[i] && bad_conn < 0) {
                    bad_at = pattern_mismatch(buf, (size_t)r, bytes[i]);
                    if (bad_at >= 0)
                        bad_conn = i;
                }
                bytes[i] += (uint64_t)r;
                if (echo) { /* the back-end may push back: write it all, blocking briefly */
                    size_t off = 0;
                    while (off < (size_t)r) {
                        ssize_t w = write(fd, buf + off, (size_t)r - off);
                        if (w < 0) {
                            if (errno == EAGAIN || errno == EINTR)
                                continue;
                            break;
                        }
                        off += (size_t)w;
                    }
                }
            }
        }
    }
    printf("{\"bytes\": [");
    for (int i = 0; i < nconn; i++)
        printf("%s%llu", i ? ", " : "", (unsigned long long)bytes[i]);
    if (bad_conn >= 0) {
        printf("], \"mismatch\": [%d, %lld]}\n", bad_conn, bad_at);
        return 4;
    }
    printf("]}\n");
    return 0;
}
