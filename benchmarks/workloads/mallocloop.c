/* --malloc cost (benchmarks/malloc_overhead.py): a malloc/free loop. Keeps a
 * window of 64 live blocks, each step frees the oldest and mallocs a new one
 * of a size cycling through 16 B .. 4 KiB. Waits DELAY seconds first (a tracer
 * attaches by PID meanwhile), then times the loop alone and prints
 * "ns_per_pair N". With TOUCH = 1 each block is written whole (memset), as a
 * program uses what it allocates. Usage: mallocloop [STEPS [DELAY [TOUCH]]] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    long steps = argc > 1 ? atol(argv[1]) : 20000000;
    double delay = argc > 2 ? atof(argv[2]) : 0;
    int touch = argc > 3 ? atoi(argv[3]) : 0;
    static const size_t sizes[] = {16, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096};
    void *window[64] = {0};
    if (delay > 0)
        usleep((useconds_t)(delay * 1e6));
    double t0 = now();
    for (long i = 0; i < steps; i++) {
        free(window[i & 63]);
        char *p = malloc(sizes[i % 10]);
        if (touch)
            memset(p, (int)i, sizes[i % 10]);
        else
            p[0] = (char)i;
        window[i & 63] = p;
    }
    double t = now() - t0;
    for (int i = 0; i < 64; i++)
        free(window[i]);
    printf("ns_per_pair %.2f\n", t / steps * 1e9);
    return 0;
}
