/* Allocates as fast as it can for SECONDS: keeps a window of 64 live blocks,
 * each step frees the oldest and mallocs 16 B .. 4 KiB (as
 * benchmarks/workloads/mallocloop.c), tens of GB a second. Prints
 * "allocated N steps M" (bytes asked for, in total), then sleeps PAUSE
 * seconds (a tick of memtrace's comes after the loop): with `run --malloc` the
 * sampler's rate cap holds its samples a second down
 * (tests/root/malloc/test_malloc_root.py). Usage: mallocfast [SECONDS [PAUSE]] */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 3;
    double pause = argc > 2 ? atof(argv[2]) : 0;
    static const size_t sizes[] = {16, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096};
    void *window[64] = {0};
    double end = now() + seconds, allocated = 0;
    long i = 0;
    do {
        for (int k = 0; k < 4096; k++, i++) {
            free(window[i & 63]);
            char *p = malloc(sizes[i % 10]);
            if (!p)
                return 1;
            p[0] = (char)i;
            window[i & 63] = p;
            allocated += (double)sizes[i % 10];
        }
    } while (now() < end);
    for (int k = 0; k < 64; k++)
        free(window[k]);
    printf("allocated %.0f steps %ld\n", allocated, i);
    fflush(stdout);
    usleep((useconds_t)(pause * 1e6));
    return 0;
}
