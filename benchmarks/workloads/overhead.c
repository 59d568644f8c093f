/* Timed workloads for benchmarks/overhead.py.
 *
 *   overhead fault [N]    first-touch faults: mmap 256 MiB, write one byte per 4 KiB
 *                         page, munmap; N times (default 16: 4 GiB). Only the touch
 *                         loops are timed.
 *   overhead mmaploop [N] N x (mmap 64 KiB, write one byte per page, munmap), timed
 *                         whole (default 200000).
 *   overhead brk [N]      N x (sbrk +64 KiB, write one byte per page, sbrk -64 KiB),
 *                         timed whole (default 200000).
 *   overhead malloc [N]   N x (malloc 64..1024 bytes, write its first and last byte,
 *                         free), timed whole (default 10000000).
 *
 * Protocol (stdin/stdout, so the driver can attach a tracer before the timed part):
 *   prints "pid N", waits for one byte on stdin, runs the timed loop, prints
 *   "elapsed SECONDS cpu SECONDS" (wall-clock time of the timed part, and the
 *   process's CPU time, user+sys, over the same timed part), then waits for EOF on stdin before exiting.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double timed_cpu; /* CPU seconds spent in the timed parts */

static void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static double run_fault(long rounds)
{
    const size_t chunk = 256UL << 20;
    double timed = 0;
    for (long r = 0; r < rounds; r++) {
        volatile char *p = map_anon(chunk);
        /* Keep it a 4 KiB fault loop even where THP is "always". */
        madvise((void *)p, chunk, MADV_NOHUGEPAGE);
        double t0 = now(), c0 = cpu_now();
        for (size_t off = 0; off < chunk; off += PAGE)
            p[off] = 1;
        timed += now() - t0;
        timed_cpu += cpu_now() - c0;
        munmap((void *)p, chunk);
    }
    return timed;
}

static double run_mmaploop(long iters)
{
    const size_t len = 64UL << 10;
    double t0 = now(), c0 = cpu_now();
    for (long i = 0; i < iters; i++) {
        volatile char *p = map_anon(len);
        for (size_t off = 0; off < len; off += PAGE)
            p[off] = 1;
        munmap((void *)p, len);
    }
    timed_cpu = cpu_now() - c0;
    return now() - t0;
}

static double run_brk(long iters)
{
    const long len = 64L << 10;
    double t0 = now(), c0 = cpu_now();
    for (long i = 0; i < iters; i++) {
        volatile char *p = sbrk(len);
        if (p == (void *)-1) {
            perror("sbrk");
            exit(1);
        }
        for (long off = 0; off < len; off += (long)PAGE)
            p[off] = 1;
        if (sbrk(-len) == (void *)-1) {
            perror("sbrk");
            exit(1);
        }
    }
    timed_cpu = cpu_now() - c0;
    return now() - t0;
}

static double run_malloc(long iters)
{
    uint32_t x = 2463534242u; /* xorshift32 */
    unsigned long sum = 0;
    double t0 = now(), c0 = cpu_now();
    for (long i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        size_t n = 64 + (x % 961); /* 64..1024 */
        volatile char *p = malloc(n);
        if (!p) {
            perror("malloc");
            exit(1);
        }
        p[0] = (char)i;
        p[n - 1] = (char)x;
        sum += (unsigned char)p[0];
        free((void *)p);
    }
    double t = now() - t0;
    timed_cpu = cpu_now() - c0;
    if (sum == 1) /* keep sum live */
        fputc(' ', stderr);
    return t;
}

int main(int argc, char **argv)
{
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s fault|mmaploop|brk|malloc [N]\n", argv[0]);
        return 2;
    }
    double (*fn)(long) = NULL;
    long n = 0;
    if (!strcmp(argv[1], "fault")) {
        fn = run_fault;
        n = 16;
    } else if (!strcmp(argv[1], "mmaploop")) {
        fn = run_mmaploop;
        n = 200000;
    } else if (!strcmp(argv[1], "brk")) {
        fn = run_brk;
        n = 200000;
    } else if (!strcmp(argv[1], "malloc")) {
        fn = run_malloc;
        n = 10000000;
    } else {
        fprintf(stderr, "unknown workload %s\n", argv[1]);
        return 2;
    }
    if (argc == 3 && (n = atol(argv[2])) <= 0) {
        fprintf(stderr, "bad count %s\n", argv[2]);
        return 2;
    }
    printf("pid %d\n", (int)getpid());
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1)
        return 3; /* driver went away before "go" */
    double t = fn(n);
    printf("elapsed %.6f cpu %.6f\n", t, timed_cpu);
    fflush(stdout);
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
