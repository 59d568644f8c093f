/* memtrace --malloc: the in-process sampler preloaded into `memtrace run`'s
 * command (docs/malloc.md). It interposes the allocation functions, counts the
 * bytes each thread allocates down from an exponential gap (mean
 * MEMTRACE_MALLOC_PERIOD bytes), and only for the allocation that exhausts the
 * gap calls memtrace_malloc_sampled(), an empty function memtrace puts a uprobe
 * on. A rate cap (MEMTRACE_MALLOC_MAX_RATE samples a second in the process)
 * raises the period while a program allocates faster than that allows, and
 * lowers it back after: each sample's weight uses the mean of the gap it ended,
 * so the estimates stay unbiased. A sampled pointer is remembered in a small
 * lock-free hash, so that its free calls memtrace_malloc_freed() (the other
 * uprobe); any other free is a hash miss. A sample the hash has no room for
 * is still handed over, its weight marked MT_UNTRACKED: memtrace counts it
 * allocated but cannot see its free, and says how many there were.
 *
 * The real allocator: preloaded (`run`), the one the program would have used
 * without the sampler, the next definition in the loader's search order
 * (dlsym RTLD_NEXT: glibc's, or jemalloc's that redis-server links, or a
 * tcmalloc preloaded after the sampler); looked up at the first call, through
 * stubs the function pointers start as. Loaded into a running process
 * (`watch`), glibc's __libc_* functions: memtrace only hands over GOT slots
 * that held glibc's.
 *
 * Built by memtrace at first use: cc -O2 -shared -fPIC (memtrace/malloc/shim.py). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

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
 * the kernel emulates (no single-step). The arguments are in rdi, rsi, rdx, rcx:
 * `period` is the mean gap the sample ended (above the one asked for while the
 * rate cap holds it up). */
EXPORT __attribute__((noinline, used)) void memtrace_malloc_sampled(void *ptr, size_t size,
                                                                    size_t weight, size_t period)
{
    __asm__ volatile("nop" : : "r"(ptr), "r"(size), "r"(weight), "r"(period) : "memory");
}

EXPORT __attribute__((noinline, used)) void memtrace_malloc_freed(void *ptr)
{
    __asm__ volatile("nop" : : "r"(ptr) : "memory");
}

/* ---- the real allocator's functions: stubs until the first call looks
 * them up (resolve). A thread that allocates while it is looking them up
 * (dlsym may allocate, on some glibc versions) is served from `arena`, whose
 * blocks are never given back (free ignores them: see release_slow). */
typedef void *(*malloc_fn)(size_t);
typedef void *(*calloc_fn)(size_t, size_t);
typedef void *(*realloc_fn)(void *, size_t);
typedef void (*free_fn)(void *);
typedef void *(*memalign_fn)(size_t, size_t);
typedef int (*posix_memalign_fn)(void **, size_t, size_t);

static void *first_malloc(size_t);
static void *first_calloc(size_t, size_t);
static void *first_realloc(void *, size_t);
static void first_free(void *);
static void *first_memalign(size_t, size_t);
static void *first_aligned_alloc(size_t, size_t);
static int first_posix_memalign(void **, size_t, size_t);
static void *first_valloc(size_t);
static void *first_pvalloc(size_t);

static malloc_fn real_malloc = first_malloc;
static calloc_fn real_calloc = first_calloc;
static realloc_fn real_realloc = first_realloc;
static free_fn real_free = first_free;
static memalign_fn real_memalign = first_memalign;
static memalign_fn real_aligned_alloc = first_aligned_alloc;
static posix_memalign_fn real_posix_memalign = first_posix_memalign;
static malloc_fn real_valloc = first_valloc;
static malloc_fn real_pvalloc = first_pvalloc;

static int glibc_aligned_alloc(void **out, size_t align, size_t size);
static void *glibc_aligned(size_t align, size_t size) { return __libc_memalign(align, size); }

#define ARENA_SIZE (64 * 1024)
static _Alignas(16) char arena[ARENA_SIZE];
static size_t arena_used;
static TLS int resolving;                       /* this thread is in resolve() */
EXPORT unsigned long memtrace_malloc_arena_blocks;   /* blocks served from arena */
/* sampled pointers in the table (and arena: 1); named for free's fast path in asm */
static unsigned long live __asm__("mt_live") __attribute__((used));

static inline int in_arena(const void *p)
{
    return (uintptr_t)p - (uintptr_t)arena < ARENA_SIZE;
}

static void *arena_alloc(size_t size, size_t align)
{
    if (align < 16)
        align = 16;
    uintptr_t base = (uintptr_t)arena;
    size_t at = __atomic_load_n(&arena_used, __ATOMIC_RELAXED), start;
    do {
        /* aligned as an address, not as an offset in the arena */
        start = ((base + at + align - 1) & ~(uintptr_t)(align - 1)) - base;
        if (start + size > ARENA_SIZE || start + size < start)
            return NULL;
    } while (!__atomic_compare_exchange_n(&arena_used, &at, start + size, 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    if (__atomic_fetch_add(&memtrace_malloc_arena_blocks, 1, __ATOMIC_RELAXED) == 0)
        __atomic_add_fetch(&live, 1, __ATOMIC_RELAXED);   /* every free looks (release) */
    return arena + start;
}

/* The functions of one allocator, in this order (memtrace_malloc_real's too). */
#define MT_NFUNCS 9
static const char *const func_names[MT_NFUNCS] = {
    "malloc", "calloc", "realloc", "free", "memalign", "aligned_alloc", "posix_memalign",
    "valloc", "pvalloc",
};

static void forward_directly(void);

/* Points the real_* pointers at fns, glibc's function where an entry is NULL. */
static void use(void *const fns[MT_NFUNCS])
{
    void *const glibc[MT_NFUNCS] = {
        (void *)__libc_malloc, (void *)__libc_calloc, (void *)__libc_realloc,
        (void *)__libc_free, (void *)__libc_memalign, (void *)glibc_aligned,
        (void *)glibc_aligned_alloc, (void *)__libc_valloc, (void *)__libc_pvalloc,
    };
    void *f[MT_NFUNCS];
    for (int i = 0; i < MT_NFUNCS; i++)
        f[i] = fns && fns[i] ? fns[i] : glibc[i];
    __atomic_store_n(&real_malloc, (malloc_fn)f[0], __ATOMIC_RELEASE);
    __atomic_store_n(&real_calloc, (calloc_fn)f[1], __ATOMIC_RELEASE);
    __atomic_store_n(&real_realloc, (realloc_fn)f[2], __ATOMIC_RELEASE);
    __atomic_store_n(&real_free, (free_fn)f[3], __ATOMIC_RELEASE);
    __atomic_store_n(&real_memalign, (memalign_fn)f[4], __ATOMIC_RELEASE);
    __atomic_store_n(&real_aligned_alloc, (memalign_fn)f[5], __ATOMIC_RELEASE);
    __atomic_store_n(&real_posix_memalign, (posix_memalign_fn)f[6], __ATOMIC_RELEASE);
    __atomic_store_n(&real_valloc, (malloc_fn)f[7], __ATOMIC_RELEASE);
    __atomic_store_n(&real_pvalloc, (malloc_fn)f[8], __ATOMIC_RELEASE);
    forward_directly();
}

/* Looked up together, stored one by one: a thread that sees one pointer set
 * and another still a stub looks them all up again (same answers). */
static void resolve(void)
{
    resolving = 1;
    void *fns[MT_NFUNCS];
    for (int i = 0; i < MT_NFUNCS; i++)
        fns[i] = dlsym(RTLD_NEXT, func_names[i]);
    use(fns);
    resolving = 0;
}

static void *first_malloc(size_t size)
{
    if (resolving)
        return arena_alloc(size, 16);
    resolve();
    return real_malloc(size);
}

static void *first_calloc(size_t n, size_t size)
{
    if (resolving) {
        if (size && n > (size_t)-1 / size)
            return NULL;
        return arena_alloc(n * size, 16);   /* static: already zero */
    }
    resolve();
    return real_calloc(n, size);
}

static void *first_realloc(void *ptr, size_t size)
{
    if (resolving)
        return ptr ? NULL : arena_alloc(size, 16);
    resolve();
    return real_realloc(ptr, size);
}

static void first_free(void *ptr)
{
    if (resolving || !ptr)
        return;
    resolve();
    real_free(ptr);
}

static void *first_memalign(size_t align, size_t size)
{
    if (resolving)
        return arena_alloc(size, align);
    resolve();
    return real_memalign(align, size);
}

static void *first_aligned_alloc(size_t align, size_t size)
{
    if (resolving)
        return arena_alloc(size, align);
    resolve();
    return real_aligned_alloc(align, size);
}

static int first_posix_memalign(void **out, size_t align, size_t size)
{
    if (resolving)
        return (*out = arena_alloc(size, align)) ? 0 : ENOMEM;
    resolve();
    return real_posix_memalign(out, align, size);
}

static void *first_valloc(size_t size)
{
    if (resolving)
        return arena_alloc(size, 4096);
    resolve();
    return real_valloc(size);
}

static void *first_pvalloc(size_t size)
{
    if (resolving)
        return arena_alloc((size + 4095) & ~(size_t)4095, 4096);
    resolve();
    return real_pvalloc(size);
}

static int glibc_aligned_alloc(void **out, size_t align, size_t size)
{
    void *p = __libc_memalign(align, size);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
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
/* samples a second in the process at most (0: no cap); -1 until read from the
 * environment; written like the period by `watch --malloc` */
EXPORT long memtrace_malloc_max_rate = -1;
/* bytes until this thread's next sample; named for malloc's fast path in asm */
static TLS long bytes_left __asm__("mt_bytes_left") __attribute__((used));
static TLS long gap_mean;           /* the mean of the gap bytes_left counts down */
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

static long read_max_rate(void)
{
    long r = __atomic_load_n(&memtrace_malloc_max_rate, __ATOMIC_RELAXED);
    if (LIKELY(r >= 0))
        return r;
    const char *s = getenv("MEMTRACE_MALLOC_MAX_RATE");
    r = s ? strtol(s, NULL, 10) : 0;
    if (r < 0)
        r = 0;
    __atomic_store_n(&memtrace_malloc_max_rate, r, __ATOMIC_RELAXED);
    return r;
}

/* ---- the rate cap. Samples are counted in windows of MT_WINDOW_NS. A window
 * that holds more than its share of the cap before it ends, or whose first
 * MT_RATE_SAMPLES or more came at over twice the cap, multiplies the period
 * new gaps are drawn with by the ratio of its rate to the cap (at least 2) and
 * starts a new window; a window that ends below a quarter of the cap
 * halves it, never below the period asked for. Gaps are exponential (no
 * memory), so a thread's gap drawn before a change is as good as one drawn
 * after: each sample is weighed with the mean of its own gap (gap_mean). */
#define MT_WINDOW_NS 25000000L
#define MT_RATE_SAMPLES 16
#define MT_PERIOD_MAX (1L << 40)
static long period_now;             /* the period new gaps are drawn with, if above the asked */
static long window_start_ns;
static long window_samples;

static long current_period(long asked)
{
    long p = __atomic_load_n(&period_now, __ATOMIC_RELAXED);
    return p > asked ? p : asked;
}

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);    /* vDSO: no call into the kernel */
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* A sample was taken: the period the next gap is drawn with. */
static long pace(long asked)
{
    long cap = read_max_rate();
    if (cap <= 0)
        return asked;
    long share = cap / (1000000000L / MT_WINDOW_NS);
    if (share < 1)
        share = 1;
    long now = now_ns();
    long start = __atomic_load_n(&window_start_ns, __ATOMIC_RELAXED);
    long n = __atomic_add_fetch(&window_samples, 1, __ATOMIC_RELAXED);
    long p = current_period(asked);
    long elapsed = now - start;
    int ended = elapsed >= MT_WINDOW_NS;
    double rate = (double)n * 1e9 / (double)(elapsed > 0 ? elapsed : 1);   /* per second */
    int over = !ended && (n > share || (n >= MT_RATE_SAMPLES && rate > 2.0 * (double)cap));
    if ((ended || over) &&
        __atomic_compare_exchange_n(&window_start_ns, &start, now, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
        __atomic_store_n(&window_samples, 0, __ATOMIC_RELAXED);
        if (over) {
            double factor = rate / (double)cap;
            factor = factor < 2 ? 2 : factor > 1024 ? 1024 : factor;
            double raised = (double)p * factor;
            p = raised > (double)MT_PERIOD_MAX ? MT_PERIOD_MAX : (long)raised;
        } else if (rate * 4 < (double)cap && p > asked) {
            p = p / 2 > asked ? p / 2 : asked;
        }
        __atomic_store_n(&period_now, p, __ATOMIC_RELAXED);
    }
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
 * thread has none yet). Its weight is size / P(sampled), P = 1 - exp(-size/mean),
 * mean the mean of the gap that ran out: the heapprofd/tcmalloc weight. */
static __attribute__((noinline)) void sampled(void *ptr, size_t size)
{
    long asked = read_period();
    if (UNLIKELY(!armed)) {         /* a new thread draws its first gap */
        armed = 1;
        gap_mean = current_period(asked);
        bytes_left = draw_gap(gap_mean) - (long)size;
        if (bytes_left > 0)
            return;
    }
    long mean = gap_mean;           /* of the gap that ran out (set with `armed`) */
    gap_mean = ptr ? pace(asked) : current_period(asked);
    bytes_left = draw_gap(gap_mean);
    if (!ptr)
        return;
    double prob = -expm1(-(double)size / (double)mean);
    size_t weight = prob > 0 ? (size_t)((double)size / prob + 0.5) : size;
    if (!remember((uintptr_t)ptr))
        weight |= MT_UNTRACKED;
    memtrace_malloc_sampled(ptr, size, weight, (size_t)mean);
}

static inline void *count(void *ptr, size_t size)
{
    bytes_left -= (long)size;
    if (UNLIKELY(bytes_left <= 0))
        sampled(ptr, size);
    return ptr;
}

/* Says the free of a sampled block; 1 if ptr is an arena block, which is
 * never given to the real allocator. */
static __attribute__((noinline, used)) int release_slow(void *ptr) __asm__("mt_release_slow");
static int release_slow(void *ptr)
{
    if (UNLIKELY(in_arena(ptr)))
        return 1;
    if (ptr && forget((uintptr_t)ptr))
        memtrace_malloc_freed(ptr);
    return 0;
}

/* Before the real free: the address may be handed out again at once. */
static inline int release(void *ptr)
{
    if (UNLIKELY(__atomic_load_n(&live, __ATOMIC_RELAXED) != 0))
        return release_slow(ptr);
    return 0;
}

static __attribute__((noinline, used)) void *malloc_sampled(size_t size) __asm__("mt_malloc_sampled");
static void *malloc_sampled(size_t size)
{
    void *p = real_malloc(size);
    sampled(p, size);
    return p;
}

/* ---- the interposed functions. malloc and free stay a few instructions and
 * a tail call to the real allocator unless this allocation is sampled or a
 * sampled block is live (then free looks its pointer up). */
#ifdef __x86_64__
/* malloc and free in assembly, so that each ends in a jump of its own to the
 * real function: `jmp rel32` in an 8-byte aligned slot (malloc_jmp, free_jmp),
 * first to mt_ind_* (a jump through real_*), rewritten into a direct jump to
 * the real function once it is known (forward_directly). A chain of jumps per
 * call, direct or not, is what made the sampler cost ~1.1x on a loop of glibc's
 * malloc and free (docs/malloc.md); one direct jump costs next to nothing. Both
 * functions are alone on their page, the only page of this file that is ever
 * written: memtrace's uprobes are on other pages. The same logic as the C
 * versions below (other architectures). */
__asm__(".pushsection .text.memtrace_hot,\"ax\",@progbits\n"
        ".p2align 12\n"
        ".globl malloc\n.type malloc,@function\nmalloc:\n"
        ".cfi_startproc\n"
        "    movq mt_bytes_left@gottpoff(%rip), %rdx\n"
        "    movq %fs:(%rdx), %rax\n"
        "    subq %rdi, %rax\n"
        "    movq %rax, %fs:(%rdx)\n"
        "    testq %rax, %rax\n"
        "    jle 1f\n"
        "    .p2align 3\n"
        "mt_malloc_jmp:\n"
        "    .byte 0xe9\n    .long mt_ind_malloc - . - 4\n    .byte 0x0f, 0x1f, 0x00\n"
        "1:  subq $8, %rsp\n"           /* the sampled stack keeps this frame, named malloc */
        ".cfi_adjust_cfa_offset 8\n"
        "    call mt_malloc_sampled\n"
        "    addq $8, %rsp\n"
        ".cfi_adjust_cfa_offset -8\n"
        "    ret\n"
        ".cfi_endproc\n"
        ".size malloc, .-malloc\n"
        ".p2align 4\n"
        ".globl free\n.type free,@function\nfree:\n"
        ".cfi_startproc\n"
        "    cmpq $0, mt_live(%rip)\n"
        "    jne 2f\n"
        "    .p2align 3\n"
        "mt_free_jmp:\n"
        "    .byte 0xe9\n    .long mt_ind_free - . - 4\n    .byte 0x0f, 0x1f, 0x00\n"
        "2:  pushq %rdi\n"
        ".cfi_adjust_cfa_offset 8\n"
        "    call mt_release_slow\n"
        "    popq %rdi\n"
        ".cfi_adjust_cfa_offset -8\n"
        "    testl %eax, %eax\n"
        "    je mt_free_jmp\n"
        "    ret\n"
        ".cfi_endproc\n"
        ".size free, .-free\n"
        ".p2align 12\n"
        ".popsection\n");

extern char mt_malloc_jmp[] __attribute__((visibility("hidden")));
extern char mt_free_jmp[] __attribute__((visibility("hidden")));

/* Where the slots jump until they are rewritten (or if they cannot be). */
static __attribute__((noinline, used)) void *ind_malloc(size_t size) __asm__("mt_ind_malloc");
static void *ind_malloc(size_t size) { return real_malloc(size); }
static __attribute__((noinline, used)) void ind_free(void *ptr) __asm__("mt_ind_free");
static void ind_free(void *ptr) { real_free(ptr); }

EXPORT unsigned long memtrace_malloc_direct;   /* slots that jump directly (of 2) */
static int patching;

static int point_slot(char *slot, void *target)
{
    intptr_t rel = (intptr_t)target - ((intptr_t)slot + 5);
    if (rel != (intptr_t)(int32_t)rel)
        return 0;
    uint64_t word = __atomic_load_n((uint64_t *)slot, __ATOMIC_RELAXED);
    int32_t rel32 = (int32_t)rel;
    memcpy((char *)&word + 1, &rel32, sizeof(rel32));
    /* one aligned store: a thread in the slot runs the old jump or the new */
    __atomic_store_n((uint64_t *)slot, word, __ATOMIC_RELEASE);
    return 1;
}

/* Rewrites the slots into direct jumps to real_malloc and real_free: one thread
 * at a time; where the page cannot be made writable and executable (W^X
 * enforced) or a function is over 2 GiB away, its slot keeps jumping through
 * the pointer. */
static void forward_directly(void)
{
    int idle = 0;
    if (!__atomic_compare_exchange_n(&patching, &idle, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return;
    void *page = (void *)((uintptr_t)mt_malloc_jmp & ~(uintptr_t)4095);
    if (mprotect(page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC) == 0) {
        unsigned long direct = point_slot(mt_malloc_jmp, (void *)real_malloc) +
                               point_slot(mt_free_jmp, (void *)real_free);
        mprotect(page, 4096, PROT_READ | PROT_EXEC);
        __atomic_store_n(&memtrace_malloc_direct, direct, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&patching, 0, __ATOMIC_RELEASE);
}
#else
static void forward_directly(void) {}

EXPORT void *malloc(size_t size)
{
    long left = bytes_left - (long)size;
    bytes_left = left;
    if (LIKELY(left > 0))
        return real_malloc(size);
    void *p = malloc_sampled(size);
    /* no tail call here: the sampled stack keeps this frame, named malloc */
    __asm__ volatile("" : : : "memory");
    return p;
}

EXPORT void free(void *ptr)
{
    if (release(ptr))
        return;
    real_free(ptr);
}
#endif

EXPORT void *calloc(size_t n, size_t size)
{
    void *p = real_calloc(n, size);
    return p ? count(p, n * size) : p;   /* calloc failed on an overflow */
}

static __attribute__((noinline)) void *realloc_arena(void *ptr, size_t size)
{
    void *q = malloc(size);
    size_t room = (size_t)(arena + ARENA_SIZE - (char *)ptr);
    if (q)
        memcpy(q, ptr, size < room ? size : room);
    return q;
}

EXPORT void *realloc(void *ptr, size_t size)
{
    /* A sampled block that moves or shrinks is freed and allocated again, as
     * far as the sampler goes. Its free is said before the real realloc: the
     * old address may be handed out to another thread as soon as the
     * allocator lets it go. (Should realloc fail, the block stays but is no
     * longer sampled; realloc(p, 0) frees p and returns NULL.) */
    if (release(ptr))
        return realloc_arena(ptr, size);
    void *q = real_realloc(ptr, size);
    return q ? count(q, size) : q;
}

EXPORT void *memalign(size_t align, size_t size)
{
    return count(real_memalign(align, size), size);
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    return count(real_aligned_alloc(align, size), size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    int err = real_posix_memalign(out, align, size);
    if (err == 0)
        count(*out, size);
    return err;
}

EXPORT void *valloc(size_t size)
{
    return count(real_valloc(size), size);
}

EXPORT void *pvalloc(size_t size)
{
    return count(real_pvalloc(size), size);
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

/* `watch --malloc`, before the slots are stored: the process's allocator,
 * whose functions the slots held (memtrace reads them from the objects'
 * symbols): glibc's, or, for a process whose malloc another library provides
 * (redis-server's jemalloc), that library's. fns: malloc, calloc, realloc,
 * free, memalign, aligned_alloc, posix_memalign, valloc, pvalloc; 0 for
 * glibc's. Returns 0 (memtrace sums what the calls of a stop return). */
EXPORT long memtrace_malloc_real(const uintptr_t *fns)
{
    void *f[MT_NFUNCS] = {0};
    for (int i = 0; fns && i < MT_NFUNCS; i++)
        f[i] = (void *)fns[i];
    use(f);
    return 0;
}

EXPORT long memtrace_malloc_interpose(long period, const struct mt_slot *slots, long n,
                                     long max_rate)
{
    if (period > 0)
        __atomic_store_n(&memtrace_malloc_period, period, __ATOMIC_RELAXED);
    if (max_rate >= 0)
        __atomic_store_n(&memtrace_malloc_max_rate, max_rate, __ATOMIC_RELAXED);
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
