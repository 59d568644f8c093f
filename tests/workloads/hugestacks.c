/* --stacks and transparent huge pages (tests/root/stacks/test_huge_stacks.py):
 * fill_huge asks for MADV_HUGEPAGE on 32 MiB (2 MiB aligned) and touches one
 * byte per 2 MiB: 16 faults, each mapping a huge page where the kernel can;
 * fill_small touches 8 MiB page by page under MADV_NOHUGEPAGE: 2,048 faults.
 * Prints "thp N" (the huge pages fill_huge got, from its own smaps_rollup's
 * AnonHugePages), "ready"; holds for argv[1] seconds; exits. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MiB (1UL << 20)
#define HUGE (2 * MiB)

static char *aligned_map(size_t size)
{
    char *p = mmap(NULL, size + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
}

__attribute__((noinline)) static void fill_huge(char *p, size_t size)
{
    if (madvise(p, size, MADV_HUGEPAGE) != 0)
        perror("madvise(MADV_HUGEPAGE)");
    for (size_t off = 0; off < size; off += HUGE)
        ((volatile char *)p)[off] = 1;
}

__attribute__((noinline)) static void fill_small(char *p, size_t size)
{
    madvise(p, size, MADV_NOHUGEPAGE);
    for (size_t off = 0; off < size; off += 4096)
        ((volatile char *)p)[off] = 1;
}

static long anon_huge_kib(void)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kib) == 1)
            break;
    if (f)
        fclose(f);
    return kib;
}

int main(int argc, char **argv)
{
    double hold = argc > 1 ? atof(argv[1]) : 2.0;
    char *huge = aligned_map(32 * MiB), *small = aligned_map(8 * MiB);
    fill_huge(huge, 32 * MiB);
    fill_small(small, 8 * MiB);
    printf("thp %ld\n", anon_huge_kib() * 1024 / (long)HUGE);
    printf("ready\n");
    fflush(stdout);
    usleep((useconds_t)(hold * 1e6));
    return 0;
}
