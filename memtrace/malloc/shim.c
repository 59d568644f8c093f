/* memtrace --malloc: the in-process sampler preloaded into `memtrace run`'s
 * command (docs/malloc.md). It interposes the allocation functions, counts the
 * bytes each thread allocates down from an exponential gap (mean
 * MEMTRACE_MALLOC_PERIOD bytes), and only for the allocation that exhausts the
 * gap calls memtrace_malloc_sampled(), an empty function memtrace puts a uprobe
 * on. A sampled pointer is remembered in a small lock-free hash, so that its
 * free calls memtrace_malloc_freed() (the other uprobe); any other free is a
 * hash miss. A sample the hash has no room for is still handed over, its
 * weight marked MT_UNTRACKED: memtrace counts it allocated but cannot see its
 * free, and says how many there were. The real allocator is glibc's, through
 * its __libc_* names (no dlsym: it may allocate, which would recurse).
 *
 * Built by memtrace at first use: cc -O2 -shared -fPIC (memtrace/malloc/shim.py). */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);

#define EXPORT __attribute__((visibility("default")))
#define TLS __thread __attribute__((tls_model("initial-exec")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* The probed functions: empty, never inlined, first instruction a `nop`, which
 * the kernel emulates (no single-step). The arguments are in rdi, rsi, rdx. */
EXPORT __attribute__((noinline, used)) void memtrace_malloc_sampled(void *ptr, size_t size,
                                                                    size_t weight)
{
    __asm__ volatile("nop" : : "r"(ptr), "r"(size), "r"(weight) : "memory");
}

EXPORT __attribute__((noinline, used)) void memtrace_malloc_freed(void *ptr)
{
    __asm__ volatile("nop" : : "r"(ptr) : "memory");
}

/* ---- sampled pointers: open addressing, linear probing, CAS; 0 empty, 1 deleted.
 * Probes are bounded: a table that has no room within MT_PROBES slots takes no
 * more samples there (counted in `dropped`). */
#define MT_SLOTS (1u << 17)
#define MT_PROBES 64
#define MT_UNTRACKED (1ull << 63)   /* weight flag: not in the table, its free goes unseen */
#define MT_EMPTY 0
#define MT_DELETED 1
static uintptr_t table[MT_SLOTS];
static unsigned long live;          /* sampled pointers in the table */
EXPORT unsigned long memtrace_malloc_dropped;   /* samples with no room in the table */

static inline uint32_t slot_of(uintptr_t p)
{
    return (uint32_t)(((p >> 4) * 0x9E3779B97F4A7C15ull) >> 40) & (MT_SLOTS - 1);
}

static int remember(uintptr_t p)
{
    uint32_t i = slot_of(p);
    for (int n = 0; n < MT_PROBES; n++, i = (i + 1) & (MT_SLOTS - 1)) {
        uintptr_t cur = __atomic_load_n(&table[i], __ATOMIC_RELAXED);
        if ((cur == MT_EMPTY || cur == MT_DELETED) &&
            __atomic_compare_exchange_n(&table[i], &cur, p, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED)) {
            __atomic_add_fetch(&live, 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    __atomic_add_fetch(&memtrace_malloc_dropped, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Removes p if it was sampled: 1 if so. The common case (nothing sampled is
 * live, or p's slot is empty) is a load or two. */
static inline int forget(uintptr_t p)
{
    if (__atomic_load_n(&live, __ATOMIC_RELAXED) == 0)
        return 0;
    uint32_t i = slot_of(p);
    for (int n = 0; n < MT_PROBES; n++, i = (i + 1) & (MT_SLOTS - 1)) {
        uintptr_t cur = __atomic_load_n(&table[i], __ATOMIC_ACQUIRE);
        if (LIKELY(cur == MT_EMPTY))
            return 0;
        if (cur == p) {
            if (__atomic_compare_exchange_n(&table[i], &cur, (uintptr_t)MT_DELETED, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                __atomic_sub_fetch(&live, 1, __ATOMIC_RELAXED);
                return 1;
            }
            return 0;
        }
    }
    return 0;
}

/* ---- the byte countdown: one per thread, exponential gaps of mean `period`. */
/* 0 until read from the environment; `watch --malloc` writes it into a
 * process it loads the sampler into, before any call reaches the sampler */
EXPORT long memtrace_malloc_period;
static TLS long bytes_left;         /* bytes until this thread's next sample */
static TLS int armed;               /* a first gap was drawn for this thread */
static TLS uint64_t rng;

static long read_period(void)
{
    long p = __atomic_load_n(&memtrace_malloc_period, __ATOMIC_RELAXED);
    if (LIKELY(p))
        return p;
    const char *s = getenv("MEMTRACE_MALLOC_PERIOD");   /* getenv does not allocate */
    p = s ? strtol(s, NULL, 10) : 0;
    if (p <= 0)
        p = 512 * 1024;
    __atomic_store_n(&memtrace_malloc_period, p, __ATOMIC_RELAXED);
    return p;
}

static uint64_t next_random(void)
{
    if (UNLIKELY(rng == 0))
        rng = (uint64_t)(uintptr_t)&rng * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)__builtin_frame_address(0) ^ 0x2545F4914F6CDD1Dull;
    rng ^= rng << 13;               /* xorshift64 */
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static long draw_gap(long p)
{
    double u = ((next_random() >> 11) + 0.5) * (1.0 / 9007199254740992.0);   /* (0, 1) */
    double gap = -log(u) * (double)p;
    return gap < 1.0 ? 1 : gap > 1e15 ? (long)1e15 : (long)gap;
}

/* The slow path: the countdown ran out at an allocation of `size` bytes (or the
 * thread has none yet). Its weight is size / P(sampled), P = 1 - exp(-size/period):
 * the heapprofd/tcmalloc weight; memtrace recomputes it from size and period. */
static __attribute__((noinline)) void sampled(void *ptr, size_t size)
{
    long p = read_period();
    if (UNLIKELY(!armed)) {         /* a new thread draws its first gap */
        armed = 1;
        bytes_left = draw_gap(p) - (long)size;
        if (bytes_left > 0)
            return;
    }
    bytes_left = draw_gap(p);
    if (!ptr)
        return;
    double prob = -expm1(-(double)size / (double)p);
    size_t weight = prob > 0 ? (size_t)((double)size / prob + 0.5) : size;
    if (!remember((uintptr_t)ptr))
        weight |= MT_UNTRACKED;
    memtrace_malloc_sampled(ptr, size, weight);
}

static inline void *count(void *ptr, size_t size)
{
    bytes_left -= (long)size;
    if (UNLIKELY(bytes_left <= 0))
        sampled(ptr, size);
    return ptr;
}

static __attribute__((noinline)) void release_slow(void *ptr)
{
    if (ptr && forget((uintptr_t)ptr))
        memtrace_malloc_freed(ptr);
}

static inline void release(void *ptr)
{
    if (UNLIKELY(__atomic_load_n(&live, __ATOMIC_RELAXED) != 0))
        release_slow(ptr);
}

static __attribute__((noinline)) void *malloc_sampled(size_t size)
{
    void *p = __libc_malloc(size);
    sampled(p, size);
    return p;
}

/* ---- the interposed functions. malloc and free stay a few instructions and
 * a tail call to glibc unless this allocation is sampled or a sampled block
 * is live (then free looks its pointer up). */
EXPORT void *malloc(size_t size)
{
    long left = bytes_left - (long)size;
    bytes_left = left;
    if (LIKELY(left > 0))
        return __libc_malloc(size);
    void *p = malloc_sampled(size);
    /* no tail call here: the sampled stack keeps this frame, named malloc */
    __asm__ volatile("" : : : "memory");
    return p;
}

EXPORT void free(void *ptr)
{
    release(ptr);       /* before the real free: the address may be handed out again */
    __libc_free(ptr);
}

EXPORT void *calloc(size_t n, size_t size)
{
    void *p = __libc_calloc(n, size);
    return p ? count(p, n * size) : p;   /* calloc failed on an overflow */
}

EXPORT void *realloc(void *ptr, size_t size)
{
    /* A sampled block that moves or shrinks is freed and allocated again, as
     * far as the sampler goes. Its free is said before the real realloc: the
     * old address may be handed out to another thread as soon as glibc lets
     * it go. (Should realloc fail, the block stays but is no longer sampled;
     * realloc(p, 0) frees p and returns NULL.) */
    release(ptr);
    void *q = __libc_realloc(ptr, size);
    return q ? count(q, size) : q;
}

EXPORT void *memalign(size_t align, size_t size)
{
    return count(__libc_memalign(align, size), size);
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    return count(__libc_memalign(align, size), size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    if (align % sizeof(void *) != 0 || (align & (align - 1)) != 0 || align == 0)
        return EINVAL;
    void *p = __libc_memalign(align, size);
    if (!p)
        return ENOMEM;
    *out = count(p, size);
    return 0;
}

EXPORT void *valloc(size_t size)
{
    return count(__libc_valloc(size), size);
}

EXPORT void *pvalloc(size_t size)
{
    return count(__libc_pvalloc(size), size);
}

/* ---- `watch --malloc` (memtrace/malloc/inject.py): memtrace loads this file
 * into a running process with dlopen, called from a thread it has stopped at a
 * safe point, then calls this function from the same thread. Each slot is a
 * GOT entry through which one of the process's objects calls a glibc
 * allocation function; it gets `value` (the sampler's function, or glibc's
 * again at detach) if it still holds `expect`, with one atomic
 * compare-and-swap: never a torn pointer for a thread calling through it, and
 * never a slot the program changed since memtrace read it. Its page is made
 * writable for that when `prot` is not -1 and given `prot` back after. Frees
 * come first in `slots`: a block is never sampled by a path whose free goes
 * around the sampler. Returns the slots stored. */
struct mt_slot {
    uintptr_t addr;
    uintptr_t expect;
    uintptr_t value;
    long prot;
};

EXPORT long memtrace_malloc_interpose(long period, const struct mt_slot *slots, long n)
{
    if (period > 0)
        __atomic_store_n(&memtrace_malloc_period, period, __ATOMIC_RELAXED);
    long done = 0;
    for (long i = 0; i < n; i++) {
        void *page = (void *)(slots[i].addr & ~(uintptr_t)4095);
        if (slots[i].prot != -1 && mprotect(page, 4096, PROT_READ | PROT_WRITE) != 0)
            continue;
        uintptr_t expect = slots[i].expect;
        done += __atomic_compare_exchange_n((uintptr_t *)slots[i].addr, &expect,
                                            slots[i].value, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_RELAXED);
        if (slots[i].prot != -1)
            mprotect(page, 4096, (int)slots[i].prot);
    }
    return done;
}
