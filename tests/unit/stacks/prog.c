#include <string.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) long inner(char *buf, long n)
{
    char local[256];
    memset(local, (int)n, sizeof local);
    memset(buf, local[n & 255], (size_t)n);
    return buf[n - 1] + local[3];
}

__attribute__((noinline)) long outer(long n)
{
    char big[4096];
    long r = inner(big, n < 4096 ? n : 4096);
    return r + big[7];
}

/* A function with no CFI at all (hand-written assembly without .cfi
   directives): the unwinder goes through it only at its first instruction. */
__asm__(".text\n.globl nocfi\n.type nocfi, @function\nnocfi:\n\tnop\n\tret\n"
        ".size nocfi, .-nocfi\n");

int main(int argc, char **argv)
{
    (void)argv;
    return (int)outer(argc * 100);
}
