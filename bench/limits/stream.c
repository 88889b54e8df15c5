/* Raw AF_UNIX stream throughput: a writer process write()s CHUNK-byte buffers into a
 * socketpair for SECONDS, a reader process drains it with read() into 256 KiB, or with
 * readv() into 16 x 4 KiB (what a guest posting 4 KiB buffers offers), until EOF.
 *
 * usage: stream CHUNK SECONDS read|readv WRITER_CPU READER_CPU [WORKING_SET]
 *
 * WORKING_SET (bytes, default 0 = one hot buffer): the side that stands for the guest cycles
 * over that many bytes instead of reusing one buffer, as the back-end does over the guest's
 * posted buffers (256 chains x 32 KiB = 8 MiB guest->host): with "read" the writer writes
 * CHUNK-byte pieces walking through WORKING_SET bytes; with "readv" the reader's 16 x 4 KiB
 * window walks through WORKING_SET bytes (256 x 4 KiB = 1 MiB host->guest). The cache then
 * sees the same footprint as through the back-end; without it the limit copies from an
 * L1/L2-resident buffer.
 * prints one JSON object: bytes, seconds (first write to EOF), writes, bytes_per_s,
 * writes_per_s. CHUNK = 64 gives the raw 64-byte write() rate. */
#include "common.h"
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: stream CHUNK SECONDS read|readv WRITER_CPU READER_CPU "
                        "[WORKING_SET]\n");
        return 2;
    }
    size_t chunk = strtoul(argv[1], NULL, 0);
    double seconds = atof(argv[2]);
    int use_readv = strcmp(argv[3], "readv") == 0;
    int wcpu = atoi(argv[4]), rcpu = atoi(argv[5]);
    size_t ws = argc == 7 ? strtoul(argv[6], NULL, 0) : 0;
    int sv[2], report[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 || pipe(report) < 0)
        die("socketpair");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) { /* reader */
        close(sv[0]);
        close(report[0]);
        pin(rcpu);
        static char big[256 * 1024];
        size_t span = use_readv && ws > 16 * 4096 ? ws / (16 * 4096) * (16 * 4096) : 0;
        char *area = span ? malloc(span) : NULL, *window = area ? area : big;
        size_t at = 0;
        struct iovec iov[16];
        if (span && !area)
            die("malloc");
        if (area)
            memset(area, 0, span);
        for (int i = 0; i < 16; i++) {
            iov[i].iov_base = window + 4096 * i;
            iov[i].iov_len = 4096;
        }
        uint64_t total = 0;
        for (;;) {
            ssize_t n = use_readv ? readv(sv[1], iov, 16) : read(sv[1], big, sizeof big);
            if (area && n > 0) { /* the next 16 x 4 KiB of the working set */
                at = (at + 16 * 4096) % span;
                for (int i = 0; i < 16; i++)
                    iov[i].iov_base = area + at + 4096 * i;
            }
            if (n == 0)
                break;
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                die("read");
            }
            total += (uint64_t)n;
        }
        uint64_t end = now_ns();
        write_all(report[1], &total, sizeof total);
        write_all(report[1], &end, sizeof end);
        _exit(0);
    }
    close(sv[1]);
    close(report[1]);
    pin(wcpu);
    size_t wspan = !use_readv && ws > chunk ? ws / chunk * chunk : chunk, woff = 0;
    char *buf = malloc(wspan);
    if (!buf)
        die("malloc");
    memset(buf, 0x5a, wspan);
    uint64_t start = now_ns();
    uint64_t stop = start + (uint64_t)(seconds * 1e9);
    uint64_t writes = 0;
    do {
        for (int k = 0; k < 16; k++) {
            write_all(sv[0], buf + woff, chunk);
            woff = woff + chunk >= wspan ? 0 : woff + chunk;
            writes++;
        }
    } while (now_ns() < stop);
    close(sv[0]);
    uint64_t total = 0, end = 0;
    if (!read_all(report[0], &total, sizeof total) || !read_all(report[0], &end, sizeof end))
        die("reader report");
    waitpid(pid, NULL, 0);
    double secs = (double)(end - start) / 1e9;
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"writes\": %llu, \"bytes_per_s\": %.1f, "
           "\"writes_per_s\": %.1f}\n",
           (unsigned long long)total, secs, (unsigned long long)writes, total / secs,
           writes / secs);
    return 0;
}
