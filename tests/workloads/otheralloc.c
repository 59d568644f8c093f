/* A program whose malloc is another library's (tests/workloads/toyalloc.c,
 * which aborts on a pointer it did not hand out), built with lazy binding:
 * calloc and realloc are first called after memtrace attached, so their GOT
 * slots still hold the program's own PLT stubs, which would bind to toyalloc.
 * argv: seconds to wait before the loop, seconds of loop. The loop keeps
 * 64 blocks, each step replacing one through malloc, calloc or realloc, at
 * about 20,000 steps a second. Prints "steps N" and exits 0. */
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
    double wait = argc > 1 ? atof(argv[1]) : 5, run = argc > 2 ? atof(argv[2]) : 3;
    void *blocks[64] = {0};
    for (int i = 0; i < 64; i++)
        blocks[i] = malloc(64);          /* malloc and free bound before attach */
    free(blocks[0]);
    blocks[0] = NULL;
    printf("ready\n");
    fflush(stdout);
    usleep((useconds_t)(wait * 1e6));
    long steps = 0;
    for (double end = now() + run; now() < end; steps++) {
        int i = (int)(steps % 64);
        size_t size = 1024 + (size_t)(steps % 7) * 512;
        switch (steps % 3) {
        case 0: free(blocks[i]); blocks[i] = malloc(size); break;
        case 1: free(blocks[i]); blocks[i] = calloc(1, size); break;
        default: blocks[i] = realloc(blocks[i], size); break;
        }
        memset(blocks[i], 1, 16);
        if (steps % 64 == 0)
            usleep(3000);
    }
    for (int i = 0; i < 64; i++)
        free(blocks[i]);
    printf("steps %ld\n", steps);
    return 0;
}
