/* Two code paths make memory resident through libc's memset, then the first
 * gives its memory back (issue 13, done-when 1). Built -O2 without frame
 * pointers, as Debian builds libc: stacks must unwind through both.
 *
 *   heldstacks HOLD_SECONDS AFTER_SECONDS [BEFORE_SECONDS]
 * sleeps BEFORE_SECONDS (default 0: time for an agent to attach on the exec),
 * prints "ready" once both are resident, sleeps HOLD_SECONDS, unmaps the
 * first, prints "released", sleeps AFTER_SECONDS and exits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MiB (1UL << 20)

#define CHUNK (2 * MiB)

/* n bytes of anonymous memory in a mapping of its own, starting and ending on
 * a 2 MiB boundary: the two paths share neither a VMA nor a 2 MiB chunk, so
 * memtrace's exact per-mapping and per-chunk figures split them exactly. */
static char *region(size_t n)
{
    char *raw = mmap(NULL, n + 2 * CHUNK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    char *p = (char *)(((unsigned long)raw + CHUNK) & ~(CHUNK - 1));
    munmap(raw, (size_t)(p - raw));                     /* a gap below ... */
    munmap(p + n, (size_t)(raw + n + 2 * CHUNK - (p + n)));   /* ... and above */
    madvise(p, n, MADV_NOHUGEPAGE);   /* 4 KiB faults: one per page, as most memory */
    return p;
}

/* The empty asm after memset keeps it a call (not a tail jump), so each
 * function's frame is on the stack while memset faults the pages in. */
__attribute__((noinline)) char *fill_big(size_t n)
{
    char *p = region(n);
    memset(p, 0x5a, n);
    __asm__ volatile("" ::: "memory");
    return p;
}

/* Runs memset's large-size path once before the two paths, so that the libc
 * text pages it executes are made resident here, not by fill_big: those
 * pages stay resident after the release and would be held by whoever first
 * faulted them (a sample there weighs the whole libc text mapping). The
 * region stays mapped: were it unmapped, a later path could reuse its 2 MiB
 * chunk and share that chunk's exact fault count with it. */
__attribute__((noinline)) char *warm_libc(void)
{
    char *p = region(CHUNK);
    memset(p, 0x11, CHUNK);
    __asm__ volatile("" ::: "memory");
    return p;
}

__attribute__((noinline)) char *fill_small(size_t n)
{
    char *p = region(n);
    memset(p, 0xa5, n);
    __asm__ volatile("" ::: "memory");
    return p;
}

int main(int argc, char **argv)
{
    unsigned hold = argc > 1 ? (unsigned)atoi(argv[1]) : 2;
    unsigned after = argc > 2 ? (unsigned)atoi(argv[2]) : 3;
    if (argc > 3)
        sleep((unsigned)atoi(argv[3]));
    char *warm = warm_libc();
    char *big = fill_big(64 * MiB);
    char *small = fill_small(16 * MiB);
    printf("ready\n");
    fflush(stdout);
    sleep(hold);
    munmap(big, 64 * MiB);
    printf("released\n");
    fflush(stdout);
    sleep(after);
    return small[12345] == (char)0xa5 && warm[1] == 0x11 ? 0 : 2;
}
