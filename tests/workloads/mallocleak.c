/* --malloc test workload (tests/root/malloc): two allocation paths at known
 * rates for SECONDS seconds, then a pause with nothing allocated or freed.
 *   churn_blocks: mallocs 64 KiB blocks, touches them and frees each one
 *                 (nothing stays outstanding)
 *   leak_slowly:  mallocs 4 KiB blocks at 1 MiB/s and never frees them
 * Prints "leaked BYTES churned BYTES" when the allocating phase is over. Build -O2 without
 * frame pointers. Usage: mallocleak [SECONDS [PAUSE]] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *volatile sink;

__attribute__((noinline)) void churn_blocks(int n)
{
    for (int i = 0; i < n; i++) {
        char *p = malloc(64 << 10);
        memset(p, i, 64 << 10);
        sink = p;
        free(p);
    }
}

__attribute__((noinline)) void *leak_slowly(void)
{
    char *p = malloc(4096);
    memset(p, 1, 4096);
    sink = p;
    return p;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    double pause = argc > 2 ? atof(argv[2]) : 3;
    double start = now();
    long leaked = 0, churned = 0;
    /* 256 steps a second: each leaks 4 KiB (1 MiB/s) and churns 8 x 64 KiB */
    for (long step = 0; now() - start < seconds; step++) {
        leak_slowly();
        leaked += 4096;
        churn_blocks(8);
        churned += 8 * (64 << 10);
        double next = start + (step + 1) / 256.0;
        while (now() < next) {
            struct timespec d = {0, 200000};
            nanosleep(&d, NULL);
        }
    }
    printf("leaked %ld churned %ld\n", leaked, churned);
    fflush(stdout);
    struct timespec d = {(time_t)pause, (long)((pause - (long)pause) * 1e9)};
    nanosleep(&d, NULL);
    return 0;
}
