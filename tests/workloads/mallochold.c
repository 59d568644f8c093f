/* Holds N blocks of 16 bytes at once (malloc'd one after the other), then
 * sleeps S seconds and exits: with `run --malloc --malloc-period 1` every
 * block is sampled, more than the sampler's table of live samples holds
 * (tests/root/malloc/test_malloc_root.py). Prints "held N". */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 200000;
    int secs = argc > 2 ? atoi(argv[2]) : 3;
    void **blocks = malloc(n * sizeof(void *));
    if (!blocks)
        return 1;
    for (long i = 0; i < n; i++) {
        blocks[i] = malloc(16);
        if (!blocks[i])
            return 1;
    }
    printf("held %ld\n", n);
    fflush(stdout);
    sleep(secs);
    return blocks[n - 1] == NULL;
}
