/* Raw eventfd + socketpair round trip with 64-byte messages, the path a guest→host→guest
 * echo takes without any software of ours in it.
 *
 * usage: rtt 2|3 ITERATIONS GUEST_CPU BACKEND_CPU HOST_CPU
 *   2: guest writes the kick eventfd; "back-end" reads it, write()s 64 bytes into a
 *      socketpair and read()s them from the other end, writes the call eventfd; guest reads
 *      it (the echo test device's path: 2 processes);
 *   3: as 2, but a third "host peer" process reads the 64 bytes and writes them back
 *      (a console port with an echoing host peer: 3 processes).
 * prints JSON: p50_ns, p99_ns, mean_ns, min_ns, iterations. */
#include "common.h"
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: rtt 2|3 ITERATIONS GUEST_CPU BACKEND_CPU HOST_CPU\n");
        return 2;
    }
    int mode = atoi(argv[1]);
    long iters = atol(argv[2]);
    int gcpu = atoi(argv[3]), bcpu = atoi(argv[4]), hcpu = atoi(argv[5]);
    int kick = eventfd(0, 0), call = eventfd(0, 0);
    int sv[2];
    if (kick < 0 || call < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
        die("setup");
    long warm = iters / 10 + 10, total_iters = iters + warm;
    pid_t host = -1;
    if (mode == 3) {
        host = fork();
        if (host == 0) {
            pin(hcpu);
            char msg[64];
            while (read_all(sv[1], msg, sizeof msg))
                write_all(sv[1], msg, sizeof msg);
            _exit(0);
        }
    }
    pid_t backend = fork();
    if (backend == 0) {
        pin(bcpu);
        char msg[64];
        uint64_t v;
        for (long i = 0; i < total_iters; i++) {
            if (read(kick, &v, 8) != 8)
                die("read kick");
            write_all(sv[0], msg, sizeof msg);
            if (mode == 3) {
                read_all(sv[0], msg, sizeof msg);
            } else {
                read_all(sv[1], msg, sizeof msg);
            }
            v = 1;
            write_all(call, &v, 8);
        }
        _exit(0);
    }
    pin(gcpu);
    uint64_t *lat = calloc((size_t)iters, sizeof *lat);
    uint64_t one = 1, v;
    for (long i = 0; i < total_iters; i++) {
        uint64_t t0 = now_ns();
        write_all(kick, &one, 8);
        if (read(call, &v, 8) != 8)
            die("read call");
        if (i >= warm)
            lat[i - warm] = now_ns() - t0;
    }
    waitpid(backend, NULL, 0);
    close(sv[0]);
    close(sv[1]);
    if (host > 0) {
        kill(host, 15);
        waitpid(host, NULL, 0);
    }
    double sum = 0;
    for (long i = 0; i < iters; i++)
        sum += (double)lat[i];
    qsort(lat, (size_t)iters, sizeof *lat, cmp_u64);
    printf("{\"p50_ns\": %llu, \"p99_ns\": %llu, \"mean_ns\": %.1f, \"min_ns\": %llu, "
           "\"iterations\": %ld}\n",
           (unsigned long long)lat[iters / 2], (unsigned long long)lat[(iters * 99) / 100],
           sum / iters, (unsigned long long)lat[0], iters);
    return 0;
}
