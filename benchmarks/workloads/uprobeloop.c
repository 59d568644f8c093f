/* What uprobe hits cost a busy program besides their own time
 * (benchmarks/uprobe_hits.py): mallocloop's malloc/free loop (a window of 64
 * blocks, 16 B .. 4 KiB), which every EVERY steps calls an empty function
 * (`nop; ret`: the kernel emulates the nop, no single-step) that a tracer may
 * probe, or makes a getppid system call instead (MODE 2), or copies the 8 KiB
 * of its own stack above the call with process_vm_readv (MODE 3: how a sampler
 * could copy a stack without a uprobe, safe at an unmapped page) or with
 * memcpy into shared memory (MODE 4: the same without a system call, where
 * the stack's end is known). Waits DELAY seconds
 * first (the tracer attaches by PID), then prints "ns_per_step N" for the loop
 * and, on stderr, the mean time of one call with its hit ("in_call_us N").
 * Usage: uprobeloop STEPS EVERY MODE(1 call, 2 getppid, 3 process_vm_readv, 4 memcpy) DELAY */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline, used)) void uprobeloop_mark(long step)
{
    __asm__ volatile("nop" : : "r"(step) : "memory");
}

#define COPY 8192
static char copy_to[COPY];
static char *shared;

/* The COPY bytes of the stack from this frame up (main keeps COPY bytes of
 * its own frame above it, so they are mapped). */
static __attribute__((noinline)) long copy_stack(int mode)
{
    const char *sp = __builtin_frame_address(0);
    if (mode == 3) {
        struct iovec to = {copy_to, COPY}, from = {(void *)sp, COPY};
        return process_vm_readv(getpid(), &to, 1, &from, 1, 0);
    }
    memcpy(shared, sp, COPY);
    return COPY;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: uprobeloop STEPS EVERY MODE DELAY\n");
        return 2;
    }
    long steps = atol(argv[1]), every = atol(argv[2]);
    int mode = atoi(argv[3]);
    double delay = atof(argv[4]);
    static const size_t sizes[] = {16, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096};
    void *window[64] = {0};
    volatile char frame[COPY];      /* the stack copy_stack copies */
    __asm__ volatile("" : : "r"(frame) : "memory");
    long next = every, calls = 0;
    double in_call = 0;
    shared = mmap(NULL, COPY, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 1;
    memset(shared, 0, COPY);
    if (delay > 0)
        usleep((useconds_t)(delay * 1e6));
    double t0 = now();
    for (long i = 0; i < steps; i++) {
        free(window[i & 63]);
        char *p = malloc(sizes[i % 10]);
        p[0] = (char)i;
        window[i & 63] = p;
        if (i == next) {
            next += every;
            double a = now();
            if (mode == 1)
                uprobeloop_mark(i);
            else if (mode == 2)
                syscall(SYS_getppid);
            else if (copy_stack(mode) <= 0)
                return 1;
            in_call += now() - a;
            calls++;
        }
    }
    double t = now() - t0;
    for (int i = 0; i < 64; i++)
        free(window[i]);
    printf("ns_per_step %.3f\n", t / steps * 1e9);
    fprintf(stderr, "in_call_us %.3f calls %ld\n", calls ? in_call / calls * 1e6 : 0.0, calls);
    return 0;
}
