/* A stand-in for jemalloc / tcmalloc (tests/unit/malloc/test_shim.py,
 * tests/root/malloc/test_watch_malloc.py): a
 * library that defines the allocation functions itself, linked before libc,
 * so the program's allocations are its own. Each block has a header with a
 * magic word; free, realloc and malloc_usable_size abort on a pointer it did
 * not hand out (as jemalloc crashes on glibc's). Never gives memory back. At
 * exit it says on stderr how many blocks it handed out. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAGIC 0x746f79616c6c6f63ull
#define REGION (4ull << 30)
struct header { uint64_t magic; uint64_t size; };
static char *region;
static uint64_t used;
static uint64_t blocks;

static void *take(size_t size, size_t align)
{
    if (!region) {
        void *r = mmap(NULL, REGION, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (r == MAP_FAILED)
            abort();
        region = r;
    }
    if (align < 16)
        align = 16;
    uint64_t at = (used + sizeof(struct header) + align - 1) & ~(uint64_t)(align - 1);
    if (at + size > REGION)
        return NULL;
    used = at + size;
    struct header *h = (struct header *)(region + at) - 1;
    h->magic = MAGIC;
    h->size = size;
    blocks++;
    return region + at;
}

static struct header *mine(void *p)
{
    struct header *h = (struct header *)p - 1;
    if ((char *)p < region || (char *)p >= region + REGION || h->magic != MAGIC) {
        static const char msg[] = "toyalloc: not my pointer\n";
        write(2, msg, sizeof msg - 1);
        abort();
    }
    return h;
}

void *malloc(size_t size) { return take(size, 16); }
void *calloc(size_t n, size_t size) { return take(n * size, 16); }   /* fresh: zero */
void free(void *p) { if (p) mine(p); }
size_t malloc_usable_size(void *p) { return p ? mine(p)->size : 0; }
void *memalign(size_t align, size_t size) { return take(size, align); }
void *aligned_alloc(size_t align, size_t size) { return take(size, align); }
void *valloc(size_t size) { return take(size, 4096); }
void *pvalloc(size_t size) { return take((size + 4095) & ~(size_t)4095, 4096); }

int posix_memalign(void **out, size_t align, size_t size)
{
    void *p = take(size, align);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

void *realloc(void *p, size_t size)
{
    void *q = take(size, 16);
    if (p && q) {
        size_t old = mine(p)->size;
        memcpy(q, p, old < size ? old : size);
    }
    return q;
}

__attribute__((destructor)) static void said(void)
{
    char line[64];
    int n = snprintf(line, sizeof line, "toyalloc %llu\n", (unsigned long long)blocks);
    write(2, line, (size_t)n);
}
