/* `watch --malloc` test workload (tests/root/malloc/test_watch_malloc.py): the
 * vector registers of a thread memtrace borrows must be as they were.
 *
 * Loads known values into ymm0..ymm15 (xmm0..xmm15 built without -DUSE_AVX),
 * then for SECONDS seconds stores them to memory and compares, in a loop that
 * calls nothing (time from a raw system call, which keeps them). Built with
 * -mgeneral-regs-only, so the C code never touches a vector register.
 * Sets errno to 4242 first and checks it too (a library call in the borrowed
 * thread may set it; the program may not have read it yet).
 * Prints "vector registers unchanged" and exits 0, or names the first register
 * that changed (or errno) and exits 1. Usage: vecregs [SECONDS] */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef USE_AVX
#define W 32
#define MOV "vmovdqu"
#define REG "ymm"
#else
#define W 16
#define MOV "movdqu"
#define REG "xmm"
#endif

#define ALL(op, a) \
    op(0, a) op(1, a) op(2, a) op(3, a) op(4, a) op(5, a) op(6, a) op(7, a) \
    op(8, a) op(9, a) op(10, a) op(11, a) op(12, a) op(13, a) op(14, a) op(15, a)
#define S(x) #x
#define XS(x) S(x)
#define LOAD(i, a) MOV " " #i "*" XS(W) "(%0), %%" REG #i "\n"
#define STORE(i, a) MOV " %%" REG #i ", " #i "*" XS(W) "(%0)\n"

static long now(void)
{
    long t;
    __asm__ volatile("syscall" : "=a"(t) : "a"(201L), "D"(0L) : "rcx", "r11", "memory");
    return t;
}

static unsigned char pattern[16 * W], seen[16 * W];

int main(int argc, char **argv)
{
    long seconds = argc > 1 ? atol(argv[1]) : 10;
    for (int i = 0; i < 16 * W; i++)
        pattern[i] = (unsigned char)(i * 7 + 1);
    __asm__ volatile(ALL(LOAD, 0) : : "r"(pattern) : "memory");
    int *err = &errno;          /* its address once: no call in the loop */
    *err = 4242;
    long end = now() + seconds;
    while (now() < end) {
        for (int k = 0; k < 100000; k++) {
            __asm__ volatile(ALL(STORE, 0) : : "r"(seen) : "memory");
            if (*err != 4242) {
                printf("errno changed to %d\n", *err);
                return 1;
            }
            for (int i = 0; i < 16 * W; i++) {
                if (seen[i] != pattern[i]) {
                    printf("%s%d changed\n", REG, i / W);
                    return 1;
                }
            }
        }
    }
    printf("vector registers unchanged\n");
    return 0;
}
