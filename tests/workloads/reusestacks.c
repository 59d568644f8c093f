/* --stacks netting when an address is given back and used again before the
 * next profile (tests/root/stacks/test_release_order.py).
 *
 * first_user makes SIZE resident through memset, gives it back, and at once
 * second_user makes the same addresses resident again (the kernel hands the
 * freed range out again). "held now" must then give the memory to
 * second_user alone: a sample first_user took there stood for a page that
 * was given back.
 *
 * Modes (argv[1]):
 *   munmap   first_user maps and unmaps; second_user maps (same address)
 *   madvise  one mapping: first_user fills, MADV_DONTNEED, second_user fills
 *   brk      the heap top: first_user grows it (sbrk), shrinks it back;
 *            second_user grows it again
 *   mremap   first_user fills, then the mapping is moved (mremap to a new
 *            address) and second_user maps and fills the old address:
 *            each holds its own SIZE
 * argv[2]: seconds to hold at the end. Prints "a=ADDR b=ADDR" on stderr. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIZE (8UL << 20)

static void *map(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

__attribute__((noinline)) void *first_user(void *p)
{
    memset(p, 1, SIZE);
    return p;
}

__attribute__((noinline)) void *second_user(void *p)
{
    memset(p, 2, SIZE);
    return p;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "munmap";
    double hold = argc > 2 ? atof(argv[2]) : 2.0;
    void *a = NULL, *b = NULL;
    usleep(300000);     /* memtrace's first snapshot: the memory comes after it */
    if (!strcmp(mode, "munmap")) {
        a = first_user(map(SIZE));
        munmap(a, SIZE);
        b = second_user(map(SIZE));
    } else if (!strcmp(mode, "madvise")) {
        a = first_user(map(SIZE));
        madvise(a, SIZE, MADV_DONTNEED);
        b = second_user(a);
    } else if (!strcmp(mode, "brk")) {
        a = sbrk(0);
        if (sbrk(SIZE) == (void *)-1) {
            perror("sbrk");
            return 2;
        }
        first_user(a);
        sbrk(-(long)SIZE);
        b = sbrk(SIZE);
        second_user(b);
    } else if (!strcmp(mode, "mremap")) {
        a = first_user(map(SIZE));
        /* somewhere else: a reservation twice the size, the move lands at its top half */
        char *spot = map(2 * SIZE);
        munmap(spot + SIZE, SIZE);
        void *moved = mremap(a, SIZE, SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, spot + SIZE);
        if (moved == MAP_FAILED) {
            perror("mremap");
            return 2;
        }
        munmap(spot, SIZE);
        b = mmap(a, SIZE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (b == MAP_FAILED) {
            perror("mmap at the old address");
            return 2;
        }
        second_user(b);
        a = moved;
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    fprintf(stderr, "a=%p b=%p\n", a, b);
    usleep((useconds_t)(hold * 1e6));
    return 0;
}
