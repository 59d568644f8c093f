/*
 * scenarios.c - memory workloads for memtrace's accuracy tests.
 *
 * Usage: scenarios SCENARIO [ARG]
 *
 * Each scenario runs as a sequence of phases.  Before the first phase and
 * after every phase the process reaches a quiescent point: it writes
 *
 *     PAUSE <phase> pid=<pid>\n            (the process that stops)
 *     PAUSE <phase> pid=<pid> child=<pid>\n (a forked child that stops)
 *
 * to the file descriptor named by the environment variable MT_SYNC_FD
 * (default 2, stderr) and stops itself with raise(SIGSTOP).  The test reads
 * the line, compares /proc/PID/smaps with memtrace while the process is
 * stopped, and resumes it with SIGCONT.  The very first point is always
 * "PAUSE start", before the scenario has done anything, so that a tracer can
 * attach first.  At the end the program writes "DONE pid=<pid>" the same way
 * and exits 0 (scenario "exit" exits with the code it is given).
 *
 * Nothing is ever printed on stdout: under `memtrace run` stdout belongs to
 * memtrace's JSON stream.  Diagnostics go to stderr.
 *
 * Scenarios and their argument:
 *   heap                brk heap: many small mallocs, free below a live top
 *                       chunk, malloc_trim(0), free the top chunk
 *   bigmalloc           mmap'd malloc: reserved, partly/fully touched, freed
 *   reserve             512 MiB PROT_NONE and untouched RW reserves, 8 MiB
 *                       committed/touched in each
 *   filemap DIR         64 MiB file written with write(), mapped MAP_SHARED
 *                       and MAP_PRIVATE, read sparsely then fully, private
 *                       writes (CoW), unlinked while mapped
 *   dlopen LIB.so [nodelete]  dlopen (RTLD_NODELETE with "nodelete"), call
 *                       dummy_touch(), dlclose
 *   madvise DIR         MADV_DONTNEED, MADV_FREE (+PAGEOUT), MADV_PAGEOUT of
 *                       anon (no swap) and of a file mapping
 *   mremap              grow in place, grow with MAYMOVE, MREMAP_FIXED move,
 *                       shrink, MREMAP_DONTUNMAP
 *   mprotect            mprotect splits a mapping into 3 and merges it back
 *   threads             4 threads malloc'ing into their own arenas
 *   thp                 MADV_HUGEPAGE 64 MiB aligned region: huge zero page,
 *                       write touch, DONTNEED, split by munmap, MADV_COLLAPSE
 *   memfd               memfd mapped twice MAP_SHARED, hole punch, truncate
 *   stack               deep recursion on the main stack and on a big
 *                       thread stack
 *   fork                fork with copy-on-write; the child pauses too
 *   populate DIR        MAP_POPULATE (private, shared anon, file),
 *                       MADV_POPULATE_WRITE
 *   mlock               mlock, munlock, mlock2(MLOCK_ONFAULT), mlockall
 *   readfile DIR        read() from a file into malloc'd and mmap'd buffers
 *   zeropage            read faults on anon memory (zero page), then writes
 *   exit CODE           one allocation phase, then exit(CODE)
 *   exec                allocate, then execve() itself as "scenarios zeropage"
 *                       (same pid, new address space, "PAUSE start" again)
 *   partial             calls that fail after changing part of their range:
 *                       mprotect, madvise(MADV_DONTFORK) and mlock over a hole
 *                       (ENOMEM), and a MAP_FIXED mmap of a perf event buffer
 *                       of a size it refuses over touched pages (EINVAL)
 *   manymaps            mprotect every other page of 16 MiB: 4096 VMAs, then
 *                       DONTNEED inside them and merge them back
 *   remote DIR          changes made by *another* process while this one is
 *                       stopped: the test truncates the mapped file and
 *                       writes through /proc/PID/mem (PAUSE lines carry
 *                       addr=/len= for that)
 *
 * Build: gcc -O1 -pthread -o scenarios scenarios.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/perf_event.h>

#ifndef MADV_FREE
#define MADV_FREE 8
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1U
#endif

#define KiB (1024UL)
#define MiB (1024UL * 1024UL)
#define PAGE 4096UL

static int sync_fd = 2;
static long page_size = 4096;

#define DIE(...)                                                          \
    do {                                                                  \
        int e_ = errno;                                                   \
        fprintf(stderr, "scenarios: " __VA_ARGS__);                       \
        fprintf(stderr, ": %s (line %d)\n", strerror(e_), __LINE__);      \
        exit(2);                                                          \
    } while (0)

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond))                                                      \
            DIE(__VA_ARGS__);                                             \
    } while (0)

/* ------------------------------------------------------------------ */
/* synchronisation with the test                                       */

/* No stdio and no malloc here: the heap scenario must not be disturbed. */
static void announce(const char *line)
{
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t n = write(sync_fd, line + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n > 0, "write to MT_SYNC_FD %d", sync_fd);
        off += (size_t)n;
    }
}

static void pause_point(const char *phase)
{
    char buf[256];
    snprintf(buf, sizeof buf, "PAUSE %s pid=%d\n", phase, (int)getpid());
    announce(buf);
    raise(SIGSTOP);
}

/* Used by a forked child: the test then checks (and resumes) the child. */
static void child_pause_point(const char *phase)
{
    char buf[256];
    int me = (int)getpid();
    snprintf(buf, sizeof buf, "PAUSE %s pid=%d child=%d\n", phase, me, me);
    announce(buf);
    raise(SIGSTOP);
}

/* A pause point that also tells the test about a memory range. */
static void pause_point_range(const char *phase, const void *addr, size_t len)
{
    char buf[256];
    snprintf(buf, sizeof buf, "PAUSE %s pid=%d addr=%lu len=%zu\n", phase,
             (int)getpid(), (unsigned long)(uintptr_t)addr, len);
    announce(buf);
    raise(SIGSTOP);
}

static void announce_done(void)
{
    char buf[64];
    snprintf(buf, sizeof buf, "DONE pid=%d\n", (int)getpid());
    announce(buf);
}

/* ------------------------------------------------------------------ */
/* helpers                                                             */

static void touch_write(void *p, size_t len, size_t step)
{
    volatile char *c = p;
    for (size_t off = 0; off < len; off += step)
        c[off] = (char)(off / step + 1);
}

static unsigned long touch_read(const void *p, size_t len, size_t step)
{
    const volatile char *c = p;
    unsigned long sum = 0;
    for (size_t off = 0; off < len; off += step)
        sum += (unsigned char)c[off];
    return sum;
}

static volatile unsigned long sink;

static void *map_anon(size_t len, int prot, int extra_flags)
{
    void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags,
                   -1, 0);
    CHECK(p != MAP_FAILED, "mmap anon %zu", len);
    return p;
}

static void do_munmap(void *p, size_t len)
{
    CHECK(munmap(p, len) == 0, "munmap %p %zu", p, len);
}

static void do_madvise(void *p, size_t len, int advice, const char *what)
{
    CHECK(madvise(p, len, advice) == 0, "madvise(%s) %p %zu", what, p, len);
}

/* Create PATH with LEN bytes written by write() (non-zero pattern), fsync'd
 * so that its page cache is clean.  Returns an O_RDWR fd. */
static int make_file(const char *path, size_t len)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0, "open %s", path);
    static char chunk[1 << 20];
    for (size_t i = 0; i < sizeof chunk; i++)
        chunk[i] = (char)(i * 31 + 7);
    size_t done = 0;
    while (done < len) {
        size_t n = len - done < sizeof chunk ? len - done : sizeof chunk;
        ssize_t w = write(fd, chunk, n);
        if (w < 0 && errno == EINTR)
            continue;
        CHECK(w > 0, "write %s", path);
        done += (size_t)w;
    }
    CHECK(fsync(fd) == 0, "fsync %s", path);
    return fd;
}

static void join_path(char *out, size_t outlen, const char *dir,
                      const char *name)
{
    int n = snprintf(out, outlen, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= outlen) {
        fprintf(stderr, "scenarios: path too long\n");
        exit(2);
    }
}

static const char *need_arg(int argc, char **argv, const char *what)
{
    if (argc < 3) {
        fprintf(stderr, "scenarios: %s needs %s\n", argv[1], what);
        exit(2);
    }
    return argv[2];
}

/* ------------------------------------------------------------------ */
/* heap: brk growth, frees below a live top chunk, malloc_trim          */

#define HEAP_CHUNKS 160000
#define HEAP_CHUNK_SIZE 200
static void *heap_chunks[HEAP_CHUNKS];

static int sc_heap(int argc, char **argv)
{
    (void)argc; (void)argv;
    /* Small chunks are served from the brk heap ([heap]). */
    for (int i = 0; i < HEAP_CHUNKS; i++) {
        heap_chunks[i] = malloc(HEAP_CHUNK_SIZE);
        CHECK(heap_chunks[i] != NULL, "malloc");
        memset(heap_chunks[i], i & 0xff, HEAP_CHUNK_SIZE);
    }
    pause_point("grown");

    /* Free everything except the last chunk: it pins the top of the heap,
     * so glibc cannot shrink the heap with brk. */
    for (int i = 0; i < HEAP_CHUNKS - 1; i++)
        free(heap_chunks[i]);
    pause_point("freed-below-top");

    /* malloc_trim(0) madvise(MADV_DONTNEED)s the free pages inside the heap. */
    malloc_trim(0);
    pause_point("trimmed");

    /* Touch the freed memory again by reallocating part of it. */
    for (int i = 0; i < HEAP_CHUNKS / 2; i++) {
        heap_chunks[i] = malloc(HEAP_CHUNK_SIZE);
        CHECK(heap_chunks[i] != NULL, "malloc");
        memset(heap_chunks[i], 0x5a, HEAP_CHUNK_SIZE);
    }
    pause_point("regrown");

    /* Free everything, including the top chunk: the heap shrinks (sbrk < 0). */
    for (int i = 0; i < HEAP_CHUNKS / 2; i++)
        free(heap_chunks[i]);
    free(heap_chunks[HEAP_CHUNKS - 1]);
    malloc_trim(0);
    pause_point("freed-all");
    return 0;
}

/* ------------------------------------------------------------------ */
/* bigmalloc: mmap'd malloc                                            */

static int sc_bigmalloc(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 48 * MiB;
    char *p = malloc(len);
    CHECK(p != NULL, "malloc %zu", len);
    pause_point("reserved");

    /* every other page of the first half */
    touch_write(p, len / 2, 2 * PAGE);
    pause_point("partly-touched");

    touch_write(p, len, PAGE);
    pause_point("fully-touched");

    free(p);
    pause_point("freed");

    /* calloc of an mmap'd chunk does not memset: pages stay untouched */
    char *c = calloc(1, 24 * MiB);
    CHECK(c != NULL, "calloc");
    sink = touch_read(c, 4 * MiB, PAGE); /* zero page reads */
    touch_write(c + 8 * MiB, 4 * MiB, PAGE);
    pause_point("calloc-touched");
    free(c);
    pause_point("calloc-freed");
    return 0;
}

/* ------------------------------------------------------------------ */
/* reserve: big untouched reserves                                     */

static int sc_reserve(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 512 * MiB;
    char *none = map_anon(len, PROT_NONE, MAP_NORESERVE);
    char *rw = map_anon(len, PROT_READ | PROT_WRITE, MAP_NORESERVE);
    pause_point("reserved");

    /* commit the first 8 MiB of the PROT_NONE reserve (splits the VMA) */
    CHECK(mprotect(none, 8 * MiB, PROT_READ | PROT_WRITE) == 0, "mprotect");
    touch_write(none, 8 * MiB, PAGE);
    pause_point("committed-protnone");

    /* touch 8 MiB in the middle of the RW reserve */
    touch_write(rw + 100 * MiB, 8 * MiB, PAGE);
    pause_point("touched-rw");

    do_munmap(none, len);
    do_munmap(rw, len);
    pause_point("released");
    return 0;
}

/* ------------------------------------------------------------------ */
/* filemap: shared and private file mappings                           */

static int sc_filemap(int argc, char **argv)
{
    const char *dir = need_arg(argc, argv, "a directory");
    char path[4096];
    /* a space and an invalid UTF-8 byte (0xe9) in the name */
    join_path(path, sizeof path, dir, "map file \xe9.bin");
    size_t len = 64 * MiB;
    int fd = make_file(path, len);
    pause_point("created");

    char *s = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(s != MAP_FAILED, "mmap shared");
    /* a second shared mapping at a file offset */
    char *so = mmap(NULL, 8 * MiB, PROT_READ, MAP_SHARED, fd, 16 * MiB);
    CHECK(so != MAP_FAILED, "mmap shared at offset");
    pause_point("mapped-shared");

    sink = touch_read(s, len, 1 * MiB);
    pause_point("shared-sparse");

    sink = touch_read(s, len, PAGE);
    sink = touch_read(so, 8 * MiB, PAGE);
    pause_point("shared-full");

    char *pv = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    CHECK(pv != MAP_FAILED, "mmap private");
    sink = touch_read(pv, len, 2 * MiB);
    pause_point("private-sparse");

    sink = touch_read(pv, len, PAGE);
    pause_point("private-full");

    /* copy-on-write: every 4th page becomes anonymous */
    touch_write(pv, len, 4 * PAGE);
    pause_point("private-cow");

    /* the mappings now show " (deleted)" */
    CHECK(unlink(path) == 0, "unlink");
    pause_point("unlinked");

    do_munmap(s, len);
    do_munmap(so, 8 * MiB);
    do_munmap(pv, len);
    close(fd);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* dlopen / dlclose                                                    */

static int sc_dlopen(int argc, char **argv)
{
    const char *lib = need_arg(argc, argv, "a shared library path");
    /* "dlopen LIB nodelete": RTLD_NODELETE, so dlclose keeps the mappings */
    int nodelete = argc > 3 && strcmp(argv[3], "nodelete") == 0;
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL | (nodelete ? RTLD_NODELETE : 0));
    if (!h) {
        fprintf(stderr, "scenarios: dlopen %s: %s\n", lib, dlerror());
        exit(2);
    }
    pause_point("loaded");

    long (*fn)(void) = (long (*)(void))dlsym(h, "dummy_touch");
    if (!fn) {
        fprintf(stderr, "scenarios: dlsym: %s\n", dlerror());
        exit(2);
    }
    sink = (unsigned long)fn();
    pause_point("touched");

    CHECK(dlclose(h) == 0, "dlclose");
    pause_point("closed");
    return 0;
}

/* ------------------------------------------------------------------ */
/* madvise                                                             */

static int sc_madvise(int argc, char **argv)
{
    const char *dir = need_arg(argc, argv, "a directory");
    size_t len = 32 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    touch_write(a, len, PAGE);
    pause_point("touched");

    do_madvise(a, 8 * MiB, MADV_DONTNEED, "DONTNEED");
    pause_point("dontneed");

    do_madvise(a + 8 * MiB, 8 * MiB, MADV_FREE, "FREE");
    pause_point("free");

    /* lazily-freed clean pages are discarded by reclaim, even without swap */
    do_madvise(a + 8 * MiB, 8 * MiB, MADV_PAGEOUT, "PAGEOUT");
    pause_point("free-pageout");

    /* ordinary anonymous pages cannot be paged out without swap */
    do_madvise(a + 16 * MiB, 8 * MiB, MADV_PAGEOUT, "PAGEOUT");
    pause_point("anon-pageout");

    /* re-fault part of the DONTNEED'd range */
    touch_write(a, 2 * MiB, PAGE);
    pause_point("refaulted");

    char path[4096];
    join_path(path, sizeof path, dir, "madvise file.bin");
    size_t flen = 16 * MiB;
    int fd = make_file(path, flen);
    char *f = mmap(NULL, flen, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(f != MAP_FAILED, "mmap file");
    sink = touch_read(f, flen, PAGE);
    pause_point("file-read");

    do_madvise(f, flen, MADV_PAGEOUT, "PAGEOUT file");
    pause_point("file-pageout");

    sink = touch_read(f, flen, PAGE);
    pause_point("file-reread");

    do_madvise(f, 8 * MiB, MADV_DONTNEED, "DONTNEED file");
    pause_point("file-dontneed");

    do_munmap(f, flen);
    close(fd);
    do_munmap(a, len);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* mremap                                                              */

static int sc_mremap(int argc, char **argv)
{
    (void)argc; (void)argv;
    /* map 16 MiB, give back the top half: the space after `a` is free */
    char *a = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    do_munmap(a + 8 * MiB, 8 * MiB);
    touch_write(a, 8 * MiB, PAGE);
    pause_point("created");

    char *b = mremap(a, 8 * MiB, 12 * MiB, 0);
    CHECK(b != MAP_FAILED, "mremap grow in place");
    CHECK(b == a, "mremap grow did not stay in place");
    touch_write(a + 8 * MiB, 4 * MiB, PAGE);
    pause_point("grown-inplace");

    /* block growth in place with a guard page right after the mapping */
    char *guard = mmap(a + 12 * MiB, PAGE, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(guard == a + 12 * MiB, "mmap guard");
    char *c = mremap(a, 12 * MiB, 24 * MiB, MREMAP_MAYMOVE);
    CHECK(c != MAP_FAILED, "mremap maymove");
    CHECK(c != a, "mremap maymove did not move");
    touch_write(c + 12 * MiB, 6 * MiB, PAGE);
    pause_point("grown-moved");

    /* move to a chosen address (replacing a placeholder mapping) */
    char *target = map_anon(32 * MiB, PROT_NONE, 0);
    char *t = mremap(c, 24 * MiB, 24 * MiB, MREMAP_MAYMOVE | MREMAP_FIXED,
                     target + 4 * MiB);
    CHECK(t == target + 4 * MiB, "mremap fixed");
    pause_point("moved-fixed");

    char *s = mremap(t, 24 * MiB, 4 * MiB, 0);
    CHECK(s == t, "mremap shrink");
    pause_point("shrunk");

    /* pages move to the new mapping, the old one stays mapped but empty */
    char *d = mremap(s, 4 * MiB, 4 * MiB, MREMAP_MAYMOVE | MREMAP_DONTUNMAP,
                     NULL);
    CHECK(d != MAP_FAILED, "mremap dontunmap");
    pause_point("dontunmap");

    do_munmap(d, 4 * MiB);
    do_munmap(target, 32 * MiB); /* covers s and the placeholder leftovers */
    do_munmap(guard, PAGE);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* mprotect                                                            */

static int sc_mprotect(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 16 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    touch_write(a, 12 * MiB, PAGE);
    pause_point("touched");

    CHECK(mprotect(a + 4 * MiB, 4 * MiB, PROT_READ) == 0, "mprotect ro");
    pause_point("split3");

    CHECK(mprotect(a + 4 * MiB, 4 * MiB, PROT_NONE) == 0, "mprotect none");
    pause_point("protnone-middle");

    CHECK(mprotect(a + 4 * MiB, 4 * MiB, PROT_READ | PROT_WRITE) == 0,
          "mprotect rw");
    pause_point("merged");

    touch_write(a + 12 * MiB, 4 * MiB, PAGE);
    do_munmap(a + 2 * MiB, 1 * MiB);
    pause_point("hole");

    do_munmap(a, len);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* threads: per-thread malloc arenas                                   */

#define NTHREADS 4
static pthread_barrier_t thr_ready, thr_release;

static void *thread_main(void *arg)
{
    long idx = (long)arg;
    enum { N = 1024, SZ = 4096 }; /* 4 MiB in small chunks -> thread arena */
    void **ptrs = malloc(N * sizeof *ptrs);
    CHECK(ptrs != NULL, "malloc");
    for (int i = 0; i < N; i++) {
        ptrs[i] = malloc(SZ);
        CHECK(ptrs[i] != NULL, "malloc");
        memset(ptrs[i], (int)(idx + i), SZ);
    }
    pthread_barrier_wait(&thr_ready);
    pthread_barrier_wait(&thr_release);
    for (int i = 0; i < N; i++)
        free(ptrs[i]);
    free(ptrs);
    return NULL;
}

static int sc_threads(int argc, char **argv)
{
    (void)argc; (void)argv;
    pthread_t th[NTHREADS];
    pthread_barrier_init(&thr_ready, NULL, NTHREADS + 1);
    pthread_barrier_init(&thr_release, NULL, NTHREADS + 1);
    for (long i = 0; i < NTHREADS; i++)
        CHECK(pthread_create(&th[i], NULL, thread_main, (void *)i) == 0,
              "pthread_create");
    pthread_barrier_wait(&thr_ready);
    pause_point("threads-alive");

    pthread_barrier_wait(&thr_release);
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(th[i], NULL);
    pause_point("threads-joined");

    malloc_trim(0);
    pause_point("trimmed");
    return 0;
}

/* ------------------------------------------------------------------ */
/* thp                                                                 */

static int sc_thp(int argc, char **argv)
{
    (void)argc; (void)argv;
    const size_t huge = 2 * MiB, len = 64 * MiB;
    char *raw = map_anon(len + huge, PROT_READ | PROT_WRITE, 0);
    char *a = (char *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
    if (a > raw)
        do_munmap(raw, (size_t)(a - raw));
    if (a + len < raw + len + huge)
        do_munmap(a + len, (size_t)(raw + len + huge - (a + len)));
    /* not fatal: a kernel without THP still runs the scenario (small pages) */
    if (madvise(a, len, MADV_HUGEPAGE) != 0)
        fprintf(stderr, "scenarios: MADV_HUGEPAGE failed: %s (continuing)\n",
                strerror(errno));
    pause_point("advised");

    /* read faults: the huge zero page */
    sink = touch_read(a, 16 * MiB, huge);
    pause_point("read-zero");

    touch_write(a, len, PAGE);
    pause_point("touched");

    do_madvise(a, 4 * MiB, MADV_DONTNEED, "DONTNEED aligned");
    pause_point("dontneed-aligned");

    /* a hole in the middle of a huge page splits its PMD mapping */
    do_munmap(a + 9 * MiB, 1 * MiB);
    pause_point("munmap-split");

    /* zap half a huge page, then collapse it back synchronously */
    do_madvise(a + 16 * MiB + 512 * KiB, 1 * MiB, MADV_DONTNEED,
               "DONTNEED partial");
    if (madvise(a + 16 * MiB, huge, MADV_COLLAPSE) != 0)
        fprintf(stderr, "scenarios: MADV_COLLAPSE failed: %s (continuing)\n",
                strerror(errno));
    pause_point("collapsed");

    do_munmap(a, 9 * MiB);
    do_munmap(a + 10 * MiB, len - 10 * MiB);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* memfd                                                               */

static int sc_memfd(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 32 * MiB;
    int fd = memfd_create("mt memfd", MFD_CLOEXEC);
    CHECK(fd >= 0, "memfd_create");
    CHECK(ftruncate(fd, (off_t)len) == 0, "ftruncate");
    char *A = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(A != MAP_FAILED, "mmap A");
    char *B = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(B != MAP_FAILED, "mmap B");
    pause_point("mapped");

    touch_write(A, 16 * MiB, PAGE);
    pause_point("touched-a");

    /* reading B maps A's pages and allocates the holes */
    sink = touch_read(B, len, PAGE);
    pause_point("read-b");

    CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    4 * MiB, 8 * MiB) == 0, "punch hole");
    pause_point("punched");

    CHECK(ftruncate(fd, 16 * MiB) == 0, "ftruncate shrink");
    pause_point("truncated");

    do_munmap(A, len);
    pause_point("unmapped-a");

    do_munmap(B, len);
    close(fd);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* stack                                                               */

#define FRAME (64 * 1024)
static pthread_barrier_t stk_ready, stk_release;

static unsigned long recurse(int depth, void (*at_bottom)(void))
{
    volatile char buf[FRAME];
    for (size_t i = 0; i < FRAME; i += PAGE)
        buf[i] = (char)depth;
    unsigned long r;
    if (depth > 1)
        r = recurse(depth - 1, at_bottom);
    else {
        at_bottom();
        r = 0;
    }
    return r + (unsigned char)buf[FRAME / 2];
}

static void main_bottom(void) { pause_point("deep"); }

static void thread_bottom(void)
{
    pthread_barrier_wait(&stk_ready);
    pthread_barrier_wait(&stk_release);
}

static void *stack_thread(void *arg)
{
    (void)arg;
    sink = recurse(256, thread_bottom); /* 16 MiB */
    return NULL;
}

static int sc_stack(int argc, char **argv)
{
    (void)argc; (void)argv;
    struct rlimit rl = {256 * MiB, 256 * MiB};
    if (setrlimit(RLIMIT_STACK, &rl) != 0) {
        /* fall back to raising the soft limit only */
        CHECK(getrlimit(RLIMIT_STACK, &rl) == 0, "getrlimit");
        rl.rlim_cur = rl.rlim_max;
        CHECK(setrlimit(RLIMIT_STACK, &rl) == 0, "setrlimit");
    }
    /* 128 frames of 64 KiB: the [stack] VMA grows by ~8 MiB */
    sink = recurse(128, main_bottom);
    pause_point("returned");

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * MiB);
    pthread_barrier_init(&stk_ready, NULL, 2);
    pthread_barrier_init(&stk_release, NULL, 2);
    pthread_t th;
    CHECK(pthread_create(&th, &attr, stack_thread, NULL) == 0,
          "pthread_create");
    pthread_barrier_wait(&stk_ready);
    pause_point("thread-deep");

    pthread_barrier_wait(&stk_release);
    pthread_join(th, NULL);
    pause_point("thread-joined");
    return 0;
}

/* ------------------------------------------------------------------ */
/* fork with copy-on-write                                             */

static int sc_fork(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 32 * MiB, slen = 8 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    touch_write(a, len, PAGE);
    char *sh = mmap(NULL, slen, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sh != MAP_FAILED, "mmap shared anon");
    touch_write(sh, slen / 2, PAGE);
    pause_point("populated");

    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        /* right after fork: everything shared copy-on-write */
        child_pause_point("child-start");

        touch_write(a, len / 2, PAGE); /* copy-on-write half */
        touch_write(sh, slen, PAGE);   /* shared: no copy */
        child_pause_point("child-cow");

        do_munmap(a + len / 2, len / 2);
        child_pause_point("child-unmapped");
        _exit(0);
    }
    int st;
    pid_t w;
    do
        w = waitpid(pid, &st, 0);
    while (w < 0 && errno == EINTR);
    CHECK(w == pid, "waitpid");
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "scenarios: fork child failed (status %#x)\n", st);
        exit(2);
    }
    pause_point("child-exited");

    /* the child is gone: writes reuse the pages, no copies */
    touch_write(a + len / 2, len / 2, PAGE);
    sink = touch_read(sh, slen, PAGE); /* maps the child's shared pages */
    pause_point("parent-written");

    do_munmap(a, len);
    do_munmap(sh, slen);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* MAP_POPULATE and MADV_POPULATE_*                                    */

static int sc_populate(int argc, char **argv)
{
    const char *dir = need_arg(argc, argv, "a directory");
    char *a = map_anon(32 * MiB, PROT_READ | PROT_WRITE, MAP_POPULATE);
    pause_point("populated-private");

    char *s = mmap(NULL, 16 * MiB, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    CHECK(s != MAP_FAILED, "mmap shared populate");
    pause_point("populated-shared");

    char path[4096];
    join_path(path, sizeof path, dir, "populate.bin");
    int fd = make_file(path, 16 * MiB);
    char *f = mmap(NULL, 16 * MiB, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd,
                   0);
    CHECK(f != MAP_FAILED, "mmap file populate");
    pause_point("populated-file");

    char *b = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    do_madvise(b, 16 * MiB, MADV_POPULATE_WRITE, "POPULATE_WRITE");
    char *r = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    do_madvise(r, 16 * MiB, MADV_POPULATE_READ, "POPULATE_READ");
    pause_point("madv-populate");

    do_munmap(a, 32 * MiB);
    do_munmap(s, 16 * MiB);
    do_munmap(f, 16 * MiB);
    do_munmap(b, 16 * MiB);
    do_munmap(r, 16 * MiB);
    close(fd);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* mlock                                                               */

static int sc_mlock(int argc, char **argv)
{
    (void)argc; (void)argv;
    char *a = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    CHECK(mlock(a, 16 * MiB) == 0, "mlock");
    pause_point("mlocked");

    CHECK(munlock(a, 16 * MiB) == 0, "munlock");
    pause_point("munlocked");

    char *b = map_anon(8 * MiB, PROT_READ | PROT_WRITE, 0);
    CHECK(mlock2(b, 8 * MiB, MLOCK_ONFAULT) == 0, "mlock2 onfault");
    touch_write(b, 4 * MiB, PAGE);
    pause_point("onfault");

    CHECK(mlockall(MCL_CURRENT | MCL_FUTURE) == 0, "mlockall");
    pause_point("mlockall");

    char *c = map_anon(8 * MiB, PROT_READ | PROT_WRITE, 0);
    pause_point("future-mmap");

    CHECK(munlockall() == 0, "munlockall");
    do_munmap(a, 16 * MiB);
    do_munmap(b, 8 * MiB);
    do_munmap(c, 8 * MiB);
    pause_point("unlocked");
    return 0;
}

/* ------------------------------------------------------------------ */
/* read() into fresh buffers                                           */

static void read_full(int fd, char *buf, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n > 0, "pread");
        done += (size_t)n;
    }
}

static int sc_readfile(int argc, char **argv)
{
    const char *dir = need_arg(argc, argv, "a directory");
    char path[4096];
    join_path(path, sizeof path, dir, "read file.bin");
    size_t len = 32 * MiB;
    int fd = make_file(path, len);
    pause_point("created");

    char *buf = malloc(len);
    CHECK(buf != NULL, "malloc");
    pause_point("malloced");

    /* the kernel's copy_to_user faults the buffer in */
    size_t done = 0;
    CHECK(lseek(fd, 0, SEEK_SET) == 0, "lseek");
    while (done < len) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n > 0, "read");
        done += (size_t)n;
    }
    pause_point("read-malloc");

    char *m = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    read_full(fd, m, 16 * MiB, 8 * MiB);
    pause_point("read-mmap");

    free(buf);
    do_munmap(m, 16 * MiB);
    close(fd);
    pause_point("freed");
    return 0;
}

/* ------------------------------------------------------------------ */
/* zero page                                                           */

static int sc_zeropage(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 16 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    sink = touch_read(a, len, PAGE); /* maps the shared zero page */
    pause_point("read-zero");

    touch_write(a, len / 2, 2 * PAGE);
    pause_point("written");

    do_madvise(a, len, MADV_DONTNEED, "DONTNEED");
    pause_point("dontneed");

    touch_write(a, 4 * MiB, PAGE);
    sink = touch_read(a, len, PAGE);
    pause_point("mixed");

    do_munmap(a, len);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* exit CODE                                                           */

static int sc_exit(int argc, char **argv)
{
    int code = atoi(need_arg(argc, argv, "an exit code"));
    char *p = malloc(8 * MiB);
    CHECK(p != NULL, "malloc");
    touch_write(p, 8 * MiB, PAGE);
    pause_point("allocated");
    return code;
}

/* ------------------------------------------------------------------ */
/* exec: same pid, new mm                                              */

static int sc_exec(int argc, char **argv)
{
    (void)argc; (void)argv;
    char *p = map_anon(16 * MiB, PROT_READ | PROT_WRITE, 0);
    touch_write(p, 16 * MiB, PAGE);
    pause_point("allocated");
    char *const args[] = {"scenarios", "zeropage", NULL};
    execv("/proc/self/exe", args);
    DIE("execv /proc/self/exe");
}

/* ------------------------------------------------------------------ */
/* partial: failed calls that changed part of their range              */

static int sc_partial(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 40 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    touch_write(a, len, PAGE);
    do_munmap(a + 8 * MiB, 1 * MiB);
    do_munmap(a + 20 * MiB, 1 * MiB);
    do_munmap(a + 28 * MiB, 1 * MiB);
    pause_point("holes");

    /* [4, 8) MiB becomes read-only, then the hole: ENOMEM */
    CHECK(mprotect(a + 4 * MiB, 8 * MiB, PROT_READ) == -1 && errno == ENOMEM,
          "mprotect over a hole did not fail with ENOMEM");
    pause_point("mprotect-partial");

    /* [14, 20) and [21, 22) MiB get VM_DONTCOPY (split off), ENOMEM for the hole */
    CHECK(madvise(a + 14 * MiB, 8 * MiB, MADV_DONTFORK) == -1 && errno == ENOMEM,
          "madvise over a hole did not fail with ENOMEM");
    pause_point("madvise-partial");

    /* [24, 28) MiB is locked (split off), then the hole: ENOMEM */
    CHECK(mlock(a + 24 * MiB, 6 * MiB) == -1 && errno == ENOMEM,
          "mlock over a hole did not fail with ENOMEM");
    pause_point("mlock-partial");

    /* A perf event buffer is 1 + 2^n pages: 4 pages are refused, after the old
     * pages under MAP_FIXED were already removed (a hole is left). Skipped
     * where perf events are not available. */
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_DUMMY;
    attr.exclude_kernel = 1;
    int fd = (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
    if (fd >= 0) {
        void *p = mmap(a + 32 * MiB, 4 * PAGE, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
        CHECK(p == MAP_FAILED, "mmap of a 4-page perf buffer succeeded");
        close(fd);
    }
    pause_point("mmap-fixed-failed");

    CHECK(munlock(a + 24 * MiB, 4 * MiB) == 0, "munlock");
    do_munmap(a, len);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* manymaps: thousands of VMAs                                         */

static int sc_manymaps(int argc, char **argv)
{
    (void)argc; (void)argv;
    size_t len = 16 * MiB;
    char *a = map_anon(len, PROT_READ | PROT_WRITE, 0);
    touch_write(a, len, PAGE);
    pause_point("touched");

    for (size_t off = 0; off < len; off += 2 * PAGE)
        CHECK(mprotect(a + off, PAGE, PROT_READ) == 0, "mprotect page");
    pause_point("fragmented");

    /* zap every 4th page (the odd, writable ones at 4k+1) */
    for (size_t off = PAGE; off < len; off += 4 * PAGE)
        do_madvise(a + off, PAGE, MADV_DONTNEED, "DONTNEED page");
    pause_point("dontneed");

    CHECK(mprotect(a, len, PROT_READ | PROT_WRITE) == 0, "mprotect all");
    pause_point("merged");

    do_munmap(a, len);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */
/* remote: another process changes our memory while we are stopped     */

static int sc_remote(int argc, char **argv)
{
    const char *dir = need_arg(argc, argv, "a directory");
    char path[4096];
    join_path(path, sizeof path, dir, "remote file.bin");
    size_t flen = 16 * MiB, alen = 16 * MiB;
    int fd = make_file(path, flen);
    char *f = mmap(NULL, flen, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(f != MAP_FAILED, "mmap file");
    sink = touch_read(f, flen, PAGE);
    char *a = map_anon(alen, PROT_READ | PROT_WRITE, 0);
    touch_write(a, PAGE, PAGE);
    pause_point_range("mapped", a, alen);

    /* the test truncates "remote file.bin" to 8 MiB while we are stopped */
    pause_point_range("remote-truncate", a, alen);

    /* the test writes every 4th page of `a` through /proc/PID/mem */
    pause_point_range("remote-write", a, alen);

    /* nothing here touches the file beyond 8 MiB (that would be SIGBUS) */
    do_munmap(f, flen);
    close(fd);
    do_munmap(a, alen);
    pause_point("unmapped");
    return 0;
}

/* ------------------------------------------------------------------ */

struct scenario {
    const char *name;
    int (*fn)(int, char **);
};

static const struct scenario scenarios[] = {
    {"heap", sc_heap},         {"bigmalloc", sc_bigmalloc},
    {"reserve", sc_reserve},   {"filemap", sc_filemap},
    {"dlopen", sc_dlopen},     {"madvise", sc_madvise},
    {"mremap", sc_mremap},     {"mprotect", sc_mprotect},
    {"threads", sc_threads},   {"thp", sc_thp},
    {"memfd", sc_memfd},       {"stack", sc_stack},
    {"fork", sc_fork},         {"populate", sc_populate},
    {"mlock", sc_mlock},       {"readfile", sc_readfile},
    {"zeropage", sc_zeropage}, {"exit", sc_exit},
    {"exec", sc_exec},         {"manymaps", sc_manymaps},
    {"remote", sc_remote},     {"partial", sc_partial},
};

int main(int argc, char **argv)
{
    const char *env = getenv("MT_SYNC_FD");
    if (env && *env)
        sync_fd = atoi(env);
    page_size = sysconf(_SC_PAGESIZE);
    if (page_size != (long)PAGE) {
        fprintf(stderr, "scenarios: page size %ld unsupported\n", page_size);
        return 2;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: scenarios SCENARIO [ARG]\nscenarios:");
        for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
            fprintf(stderr, " %s", scenarios[i].name);
        fprintf(stderr, "\n");
        return 2;
    }
    for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
        if (strcmp(argv[1], scenarios[i].name) == 0) {
            pause_point("start");
            int rc = scenarios[i].fn(argc, argv);
            announce_done();
            return rc;
        }
    }
    fprintf(stderr, "scenarios: unknown scenario %s\n", argv[1]);
    return 2;
}
