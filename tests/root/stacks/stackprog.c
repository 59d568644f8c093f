/* The --stacks capture test's program (tests/root/stacks/test_capture_root.py).
 * Built with -O2 -fomit-frame-pointer: no frame pointers, as Debian's libc.
 *
 *   stackprog A_BYTES B_BYTES C_BYTES ROUNDS
 *
 * Prints "pid N path_a X path_b Y path_c Z" (the functions' run-time
 * addresses), then for each round waits for a byte on stdin, unmaps the last
 * round's regions, makes A_BYTES resident through libc memset in path_a,
 * B_BYTES the same way in path_b and C_BYTES by read() from /dev/zero in
 * path_c (kernel-mode faults), and prints "round R a X b Y c Z" (the
 * regions). Prints "done" and exits after the last round's next byte or EOF. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile char sink;

static char *region(size_t len)
{
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        exit(2);
    /* one fault per 4 KiB page: the test counts a fault as a page */
    if (madvise(p, len, MADV_NOHUGEPAGE) != 0)
        exit(2);
    return p;
}

/* The load after memset keeps the call a call (not a tail jump), so the
 * return address into path_a is on the stack while memset faults. */
__attribute__((noinline)) char *path_a(size_t len)
{
    char *p = region(len);
    memset(p, 0x5a, len);
    sink = p[len - 1];
    return p;
}

__attribute__((noinline)) char *path_b(size_t len)
{
    char *p = region(len);
    memset(p, 0xa5, len);
    sink = p[len - 1];
    return p;
}

__attribute__((noinline)) char *path_c(size_t len)
{
    char *p = region(len);
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0)
        exit(2);
    for (size_t done = 0; done < len;) {
        ssize_t n = read(fd, p + done, len - done);
        if (n <= 0)
            exit(3);
        done += (size_t)n;
    }
    close(fd);
    sink = p[len - 1];
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        return 1;
    size_t la = strtoul(argv[1], NULL, 0), lb = strtoul(argv[2], NULL, 0);
    size_t lc = strtoul(argv[3], NULL, 0);
    int rounds = atoi(argv[4]);
    printf("pid %d path_a %lx path_b %lx path_c %lx\n", (int)getpid(),
           (unsigned long)&path_a, (unsigned long)&path_b, (unsigned long)&path_c);
    fflush(stdout);
    char *a = NULL, *b = NULL, *c = NULL;
    char byte;
    for (int r = 0; r < rounds; r++) {
        if (read(0, &byte, 1) != 1)
            return 0;
        if (a) {
            munmap(a, la);
            munmap(b, lb);
            munmap(c, lc);
        }
        a = path_a(la);
        b = path_b(lb);
        c = path_c(lc);
        printf("round %d a %lx b %lx c %lx\n", r, (unsigned long)a, (unsigned long)b,
               (unsigned long)c);
        fflush(stdout);
    }
    (void)!read(0, &byte, 1);
    printf("done\n");
    fflush(stdout);
    return 0;
}
