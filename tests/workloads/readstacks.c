/* Half of one 48 MiB mapping made resident by the kernel, half by the program:
 * fill_by_read read()s /dev/zero into the first 24 MiB (the kernel writes
 * the pages: kernel-mode faults, the user registers those of the read call),
 * fill_by_memset writes the other 24 MiB through libc's memset (user-mode
 * faults). Prints "ready", then sleeps SECONDS. With `--stacks`, "held now"
 * must split the mapping between the two (tests/root/stacks/test_held_stacks.py);
 * were kernel-mode faults not sampled, the per-mapping scaling would give
 * fill_by_memset all 48 MiB. Usage: readstacks [SECONDS] */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HALF (24UL << 20)

__attribute__((noinline)) void fill_by_read(char *p, size_t n)
{
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0)
        exit(1);
    for (size_t done = 0; done < n;) {
        ssize_t got = read(fd, p + done, n - done < (1 << 20) ? n - done : (1 << 20));
        if (got <= 0)
            exit(1);
        done += (size_t)got;
    }
    close(fd);
}

__attribute__((noinline)) void fill_by_memset(char *p, size_t n)
{
    memset(p, 1, n);
    __asm__ volatile("" : : "r"(p) : "memory");   /* no tail call: this frame stays */
}

int main(int argc, char **argv)
{
    int seconds = argc > 1 ? atoi(argv[1]) : 3;
    char *p = mmap(NULL, 2 * HALF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 1;
    madvise(p, 2 * HALF, MADV_NOHUGEPAGE);   /* 4 KiB faults: one per page */
    fill_by_read(p, HALF);
    fill_by_memset(p + HALF, HALF);
    printf("ready\n");
    fflush(stdout);
    sleep((unsigned)seconds);
    return p[0] == 0 && p[HALF] == 1 ? 0 : 2;
}
