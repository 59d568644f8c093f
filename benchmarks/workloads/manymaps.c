/* Workload for benchmarks/polling.py: ~4 GiB resident in NREGIONS separate
 * mappings, then a steady trickle of page changes.
 *
 *   manymaps NREGIONS PAGES_PER_REGION SECONDS MODE
 *
 * Maps NREGIONS anonymous regions of PAGES_PER_REGION pages each, alternating
 * PROT_READ|PROT_WRITE and PROT_READ|PROT_WRITE|PROT_EXEC so that neighbours
 * never merge into one VMA, and writes every page. Prints "pid N" first and
 * "ready" when everything is resident, then waits for one byte on stdin.
 * After that, once per second for SECONDS seconds, it touches 1% of its
 * regions (a rotating window, every page of each):
 *   MODE refault: madvise(MADV_DONTNEED) the region, then write every page,
 *                 so each touched page is freed and faulted in again;
 *   MODE rewrite: write every page (already resident: no faults).
 * Prints "tick N" after each second's touches and "done" at the end, then
 * sleeps until killed (at most 600 s), so the driver can inspect it stopped.
 */
#define _GNU_SOURCE
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

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s NREGIONS PAGES_PER_REGION SECONDS refault|rewrite\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]);
    size_t len = (size_t)atol(argv[2]) * PAGE;
    long seconds = atol(argv[3]);
    int refault = !strcmp(argv[4], "refault");
    if (n <= 0 || len == 0 || seconds < 0 || (!refault && strcmp(argv[4], "rewrite"))) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    printf("pid %d\n", (int)getpid());
    fflush(stdout);

    char **regions = calloc(n, sizeof(*regions));
    if (!regions)
        return 1;
    for (long i = 0; i < n; i++) {
        int prot = PROT_READ | PROT_WRITE | ((i & 1) ? PROT_EXEC : 0);
        char *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "mmap #%ld: ", i);
            perror("");
            return 1;
        }
        for (size_t off = 0; off < len; off += PAGE)
            p[off] = (char)i;
        regions[i] = p;
    }
    printf("ready\n");
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1)
        return 3;

    long per_tick = n / 100 > 0 ? n / 100 : 1;
    long cursor = 0;
    double next = now();
    for (long t = 0; t < seconds; t++) {
        for (long k = 0; k < per_tick; k++) {
            char *p = regions[cursor];
            cursor = (cursor + 1) % n;
            if (refault)
                madvise(p, len, MADV_DONTNEED);
            for (size_t off = 0; off < len; off += PAGE)
                p[off] = (char)(t + k);
        }
        printf("tick %ld\n", t);
        fflush(stdout);
        next += 1.0;
        double d = next - now();
        if (d > 0) {
            struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    printf("done\n");
    fflush(stdout);
    sleep(600);
    return 0;
}
