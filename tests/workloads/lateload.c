/* `watch --malloc` test workload (tests/root/malloc/test_watch_malloc.py): a
 * library loaded after memtrace put its sampler into the running process.
 *
 * Built twice: as the program, and with -DLATE_LIB -shared -fPIC as the
 * library. The program waits WAIT seconds (memtrace attaches meanwhile),
 * dlopens LIB and says "loaded", lets QUIET seconds pass, then for SECONDS
 * seconds makes 256 steps a second, each:
 *   late_leak():       the library mallocs 4 KiB and keeps it (1 MiB/s)
 *   churn_in_program(): the program mallocs 64 KiB ...
 *   late_free(p):       ... and the library frees it
 * then prints "leaked BYTES churned BYTES" and sleeps PAUSE seconds.
 * Usage: lateload LIB [WAIT [QUIET [SECONDS [PAUSE]]]] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *volatile sink;

#ifdef LATE_LIB
__attribute__((noinline)) void *late_leak(void)
{
    char *p = malloc(4096);
    memset(p, 1, 4096);
    sink = p;
    return p;
}

void late_free(void *p)
{
    free(p);
}
#else
#include <dlfcn.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_for(double s)
{
    struct timespec d = {(time_t)s, (long)((s - (long)s) * 1e9)};
    nanosleep(&d, NULL);
}

__attribute__((noinline)) void *churn_in_program(void)
{
    char *p = malloc(64 << 10);
    memset(p, 2, 64 << 10);
    return p;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    double wait = argc > 2 ? atof(argv[2]) : 6;
    double quiet = argc > 3 ? atof(argv[3]) : 4;
    double seconds = argc > 4 ? atof(argv[4]) : 8;
    double pause = argc > 5 ? atof(argv[5]) : 3;
    sleep_for(wait);
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    void *(*leak)(void) = (void *(*)(void))dlsym(lib, "late_leak");
    void (*release)(void *) = (void (*)(void *))dlsym(lib, "late_free");
    printf("loaded\n");
    fflush(stdout);
    sleep_for(quiet);
    long leaked = 0, churned = 0;
    double start = now();
    for (long step = 0; now() - start < seconds; step++) {
        leak();
        leaked += 4096;
        release(churn_in_program());
        churned += 64 << 10;
        double next = start + (step + 1) / 256.0;
        while (now() < next)
            sleep_for(0.0002);
    }
    printf("leaked %ld churned %ld\n", leaked, churned);
    fflush(stdout);
    sleep_for(pause);
    return 0;
}
#endif
