/* The gate's test workload (tests/root/cli/test_gate.py): for SECONDS seconds,
 * either leaks RATE_KIB KiB per second of anonymous memory it touches (malloc'd
 * 64 KiB blocks, never freed: they land in [heap] or in anonymous mappings),
 * or, with RATE_KIB 0, holds a steady 32 MiB it keeps touching. Exits STATUS.
 * Usage: leakrate SECONDS RATE_KIB STATUS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void nap(double seconds)
{
    struct timespec d = {(time_t)seconds, (long)((seconds - (long)seconds) * 1e9)};
    nanosleep(&d, NULL);
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    long rate_kib = argc > 2 ? atol(argv[2]) : 1024;
    int status = argc > 3 ? atoi(argv[3]) : 0;
    const long block = 64 << 10;
    double start = now();
    long held = 0;
    char *steady = NULL;
    if (rate_kib == 0) {
        steady = malloc(32 << 20);
        memset(steady, 1, 32 << 20);
    }
    /* 16 steps a second */
    for (long step = 0; now() - start < seconds; step++) {
        if (rate_kib > 0) {
            long due = (long)((step + 1) * rate_kib * 1024.0 / 16);
            while (held < due) {
                char *p = malloc(block);
                memset(p, 2, block);
                held += block;
            }
        } else {
            memset(steady, (int)step, 32 << 20);
        }
        double next = start + (step + 1) / 16.0;
        double left = next - now();
        if (left > 0)
            nap(left);
    }
    printf("held %ld bytes\n", held + (steady ? 32L << 20 : 0));
    fflush(stdout);
    return status;
}
