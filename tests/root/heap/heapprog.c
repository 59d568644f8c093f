/* Heap shapes for `memtrace heap` tests. Usage: heapprog MODE [N]
 * Prints "READY" when the heap is in shape, then obeys one-letter commands on
 * stdin: t = malloc_trim(0) (prints "TRIM rc"), m = mallinfo2 (prints
 * "MALLINFO arena ordblks uordblks fordblks hblks hblkhd keepcost fsmblks"),
 * f = free the pin chunk (mode hole), q = exit.  Output goes through write(2)
 * and input through read(2): stdio would allocate its buffers on the heap. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, n) != n) _exit(3);
}

static void *pin;
static volatile int stop_threads;
static int thread_go[2];
static int thread_done[2];

static void *churn_main(void *arg) {
    /* allocate and free all the time, from tcache sizes to large chunks */
    unsigned long x = (unsigned long)arg * 2654435761u + 1;
    void *slot[4096] = {0};
    /* the first malloc gives the thread its arena and its tcache: say so */
    free(malloc(16));
    if (write(thread_done[1], "d", 1) != 1) return NULL;
    for (;;) {
        x = x * 6364136223846793005ul + 1442695040888963407ul;
        unsigned i = (unsigned)(x >> 33) % 4096;
        free(slot[i]);
        size_t sz = (x >> 20) % 8 == 0 ? 1000 + (x >> 40) % 60000 : 16 + (x >> 40) % 500;
        slot[i] = malloc(sz);
        memset(slot[i], 5, 16);
    }
    return NULL;
}

static void *bigthread_main(void *arg) {
    /* one thread arena grown past HEAP_MAX_SIZE (64 MiB): several heaps */
    long n = (long)arg;
    void **v = malloc(sizeof(void *) * n);
    for (long i = 0; i < n; i++) { v[i] = malloc(1000); memset(v[i], 6, 1000); }
    for (long i = 0; i < n; i += 4) free(v[i]);
    if (write(thread_done[1], "d", 1) != 1) return NULL;
    char c;
    if (read(thread_go[0], &c, 1) < 0) return NULL;
    return NULL;
}

static void *thread_main(void *arg) {
    long id = (long)arg;
    /* each thread builds its own arena: live data, a freed hole, cached chunks */
    int n = 20000;
    void **v = malloc(sizeof(void *) * n);
    for (int i = 0; i < n; i++) { v[i] = malloc(100 + (i % 7) * 16); memset(v[i], (int)id, 100); }
    for (int i = 0; i < n; i += 2) free(v[i]);
    if (write(thread_done[1], "d", 1) != 1) return NULL;
    char c;
    if (read(thread_go[0], &c, 1) < 0) return NULL;  /* block until exit */
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hole";
    long n = argc > 2 ? atol(argv[2]) : 200000;
    void **v = NULL;
    pthread_t th[8];
    int nthreads = 0;
    if (!strcmp(mode, "hole") || !strcmp(mode, "topfree")) {
        /* many small chunks, then one live chunk at the top; free the small ones */
        v = malloc(sizeof(void *) * n);
        for (long i = 0; i < n; i++) { v[i] = malloc(200); memset(v[i], 1, 200); }
        pin = malloc(200);
        memset(pin, 2, 200);
        for (long i = 0; i < n; i++) free(v[i]);
        free(v);
        if (!strcmp(mode, "topfree")) { free(pin); pin = NULL; }
    } else if (!strcmp(mode, "big")) {
        v = malloc(sizeof(void *) * 4);
        v[0] = malloc(64 << 20); memset(v[0], 1, 32 << 20);  /* own mmap, half touched */
        v[1] = malloc(1000);
        v[2] = malloc(300 << 10); memset(v[2], 1, 300 << 10); /* above the 128 KiB threshold */
    } else if (!strcmp(mode, "threads")) {
        if (pipe(thread_go) || pipe(thread_done)) return 2;
        nthreads = (int)(n > 8 || n < 1 ? 4 : n);
        for (long i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, thread_main, (void *)i);
        for (int i = 0; i < nthreads; i++) {  /* until every thread has shaped its arena */
            char done;
            if (read(thread_done[0], &done, 1) != 1) return 2;
        }
    } else if (!strcmp(mode, "tcache")) {
        /* fill every tcache bin (7 each) and the fastbins, keep neighbours live */
        long k = 0;
        v = malloc(sizeof(void *) * 64 * 40);
        for (int round = 0; round < 20; round++)
            for (int b = 0; b < 64; b++) { v[k] = malloc(24 + 16 * b); memset(v[k], 3, 24); k++; }
        for (long i = 0; i < k; i += 2) free(v[i]);  /* every other: no coalescing */
    } else if (!strcmp(mode, "bigthread")) {
        if (pipe(thread_go) || pipe(thread_done)) return 2;
        nthreads = 1;
        pthread_create(&th[0], NULL, bigthread_main, (void *)n);
        char done;
        if (read(thread_done[0], &done, 1) != 1) return 2;  /* until it has allocated */
    } else if (!strcmp(mode, "churn")) {
        /* n threads (1..8) changing their heaps all the time; never joined. READY
         * once every thread has its own arena and tcache (and so has the main
         * thread): 1 + n tcaches, n thread arenas, however loaded the machine */
        if (pipe(thread_go) || pipe(thread_done)) return 2;
        free(malloc(16));
        nthreads = 0;
        long nchurn = n > 8 || n < 1 ? 2 : n;
        for (long i = 0; i < nchurn; i++)
            pthread_create(&th[i], NULL, churn_main, (void *)i);
        for (long i = 0; i < nchurn; i++) {
            char done;
            if (read(thread_done[0], &done, 1) != 1) return 2;
        }
    } else if (!strcmp(mode, "many")) {
        /* n live-or-free chunks of 512..1535 bytes (about 1 KiB each): every
         * third one freed, so free chunks do not coalesce (benchmarks) */
        v = malloc(sizeof(void *) * n);
        for (long i = 0; i < n; i++) {
            size_t sz = 512 + (size_t)(i * 7919 % 1024);
            v[i] = malloc(sz);
            memset(v[i], 4, sz);
        }
        for (long i = 0; i < n; i += 3) free(v[i]);
    } else if (!strcmp(mode, "forked")) {
        /* the heap used, then a fork whose child grows it (n chunks of 1 KiB):
         * the child's [heap] is two VMAs (the kernel does not merge the
         * growth into a VMA whose anon_vma is shared with the parent's), as
         * in Debian's nginx workers. The child goes on as the program (READY
         * says its pid); the parent waits for it. */
        v = malloc(sizeof(void *) * 64);
        for (int i = 0; i < 64; i++) { v[i] = malloc(1024); memset(v[i], 5, 1024); }
        pid_t child = fork();
        if (child < 0) return 2;
        if (child > 0) {
            int status;
            waitpid(child, &status, 0);
            return 0;
        }
        v = malloc(sizeof(void *) * n);
        for (long i = 0; i < n; i++) { v[i] = malloc(1024); memset(v[i], 6, 1024); }
        for (long i = 0; i < n; i += 4) free(v[i]);
    } else {
        say("ERROR unknown mode %s\n", mode);
        return 2;
    }
    say("READY %d\n", getpid());
    char c;
    while (read(0, &c, 1) == 1) {
        if (c == 't') {
#ifdef __GLIBC__
            int rc = malloc_trim(0);
#else
            int rc = -1;
#endif
            say("TRIM %d\n", rc);
        } else if (c == 'm') {
#ifdef __GLIBC__
            struct mallinfo2 m = mallinfo2();
            say("MALLINFO %zu %zu %zu %zu %zu %zu %zu %zu\n", m.arena, m.ordblks, m.uordblks,
                m.fordblks, m.hblks, m.hblkhd, m.keepcost, m.fsmblks);
#else
            say("MALLINFO 0 0 0 0 0 0 0 0\n");
#endif
        } else if (c == 'f') {
            free(pin);
            pin = NULL;
            say("FREED\n");
        } else if (c == 'q') {
            break;
        }
    }
    if (nthreads) {
        close(thread_go[1]);
        for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
    }
    return 0;
}
