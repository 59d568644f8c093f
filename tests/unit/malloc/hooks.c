/* Stands in for memtrace's uprobes in tests/unit/malloc/test_shim.py: this
 * program defines the sampler's two probed functions itself (exported with
 * -rdynamic, so the preloaded shim's calls land here), sums the weights of
 * sampled allocations and nets them on frees. It allocates a known mix of
 * sizes through malloc, calloc, realloc and posix_memalign, frees every other
 * block, and prints: allocated kept sampled_weight outstanding_weight samples frees
 * untracked largest_period seconds (of the allocation loop) direct (the shim's
 * memtrace_malloc_direct: its malloc and free jumping directly to the real
 * allocator, of 2; -1 without the shim). With a second
 * argument N, every block is N bytes (malloc only).
 * The hooks never allocate. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLOTS (1 << 20)
static uintptr_t keys[SLOTS];
static size_t vals[SLOTS];
static double sampled_weight, outstanding;
static long samples, frees, untracked;
static size_t period_max;
#define UNTRACKED (1ull << 63)

static size_t slot(uintptr_t p)
{
    size_t i = (p >> 4) * 0x9E3779B97F4A7C15ull >> 44;
    while (keys[i] && keys[i] != p)
        i = (i + 1) & (SLOTS - 1);
    return i;
}

void memtrace_malloc_sampled(void *ptr, size_t size, size_t weight, size_t period)
{
    (void)size;
    if (period > period_max)
        period_max = period;
    if (weight & UNTRACKED) {   /* the shim will not report its free */
        untracked++;
        sampled_weight += weight & ~UNTRACKED;
        return;
    }
    size_t i = slot((uintptr_t)ptr);
    keys[i] = (uintptr_t)ptr;
    vals[i] = weight;
    samples++;
    sampled_weight += weight;
    outstanding += weight;
}

void memtrace_malloc_freed(void *ptr)
{
    size_t i = slot((uintptr_t)ptr);
    if (keys[i] == (uintptr_t)ptr) {
        outstanding -= vals[i];
        keys[i] = 1;    /* a tombstone: never equal to a pointer, keeps chains */
        frees++;
    }
}

static const size_t sizes[] = {24, 100, 512, 4000, 20000, 70000, 300000};
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 20000;
    size_t fixed = argc > 2 ? (size_t)atol(argv[2]) : 0;
    void **blocks = calloc(n, sizeof(void *));
    double allocated = n * sizeof(void *), kept = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        size_t size = fixed ? fixed : sizes[i % NSIZES];
        void *p;
        switch (fixed ? 0 : i % 4) {
        case 0: p = malloc(size); break;
        case 1: p = calloc(1, size); break;
        case 2: p = realloc(NULL, size); break;
        default: if (posix_memalign(&p, 64, size)) return 1;
        }
        memset(p, 1, size < 64 ? size : 64);
        blocks[i] = p;
        allocated += size;
        if (i % 2 == 0)
            kept += size;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (long i = 1; i < n; i += 2)
        free(blocks[i]);
    const unsigned long *direct = dlsym(RTLD_DEFAULT, "memtrace_malloc_direct");
    printf("%.0f %.0f %.0f %.0f %ld %ld %ld %zu %.6f %ld\n", allocated, kept + n * sizeof(void *),
           sampled_weight, outstanding, samples, frees, untracked, period_max,
           (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
           direct ? (long)*direct : -1L);
    return 0;
}
