/*
 * pssfork.c - a forked "server" with copy-on-write children, for the PSS/USS
 * tests (tests/root/accuracy/test_pss.py).
 *
 * Usage: pssfork NCHILDREN FILE
 *
 * The parent maps and writes anonymous memory (small pages and, where THP is
 * available, a MADV_HUGEPAGE region of 4 MiB), maps FILE shared and private
 * (read), then forks NCHILDREN children. Right after fork everything is
 * shared copy-on-write. Child i writes (i + 1) * 16 pages of the small-page
 * region (so those pages become private), the first 8 pages of the THP
 * region (splitting the PMD mapping in that child: a PTE-mapped large folio
 * shared with the parent), and reads the file mappings. Each process then
 * prints "READY <pid>" on stdout and stops itself with SIGSTOP (children in
 * fork order, the parent last). The test compares and then kills the parent
 * with SIGKILL; the children die with it (PR_SET_PDEATHSIG).
 *
 * Build: gcc -O1 -o pssfork pssfork.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL_PAGES 1024
#define THP_SIZE (4UL << 20)

static void ready(void)
{
    char line[64];
    int n = snprintf(line, sizeof line, "READY %d\n", (int)getpid());
    if (write(1, line, (size_t)n) != n)
        _exit(3);
    raise(SIGSTOP);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: pssfork NCHILDREN FILE\n");
        return 2;
    }
    int nchildren = atoi(argv[1]);
    long page = sysconf(_SC_PAGESIZE);

    char *small = mmap(NULL, SMALL_PAGES * page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (small == MAP_FAILED)
        return 3;
    madvise(small, SMALL_PAGES * page, MADV_NOHUGEPAGE);
    for (long i = 0; i < SMALL_PAGES; i++)
        small[i * page] = (char)i;

    /* a 2 MiB-aligned THP region (falls back to small pages without THP) */
    char *raw = mmap(NULL, THP_SIZE + (2UL << 20), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return 3;
    char *thp = (char *)(((unsigned long)raw + (2UL << 20) - 1) & ~((2UL << 20) - 1));
    madvise(thp, THP_SIZE, MADV_HUGEPAGE);
    memset(thp, 1, THP_SIZE);

    /* a read-only touched anonymous page range: the zero page, not counted */
    char *zero = mmap(NULL, 64 * page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zero == MAP_FAILED)
        return 3;
    volatile char sink = 0;
    for (long i = 0; i < 64; i++)
        sink += zero[i * page];

    int fd = open(argv[2], O_RDONLY);
    if (fd < 0)
        return 3;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return 3;
    char *shared = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    char *priv = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (shared == MAP_FAILED || priv == MAP_FAILED)
        return 3;
    for (off_t off = 0; off < st.st_size; off += page * 2)
        sink += shared[off];
    priv[0] = 1; /* one CoW page of a file mapping: anonymous, private */

    for (int c = 0; c < nchildren; c++) {
        pid_t pid = fork();
        if (pid < 0)
            return 4;
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            for (long i = 0; i < (c + 1) * 16; i++)
                small[i * page] = (char)(i + 1);
            for (long i = 0; i < 8; i++)
                thp[i * page] = 2;
            for (off_t off = 0; off < st.st_size; off += page)
                sink += priv[off] + shared[off];
            ready();
            _exit(0);
        }
        /* one child at a time: READY lines in fork order */
        int status;
        if (waitpid(pid, &status, WUNTRACED) != pid || !WIFSTOPPED(status))
            return 5;
    }
    ready();
    return (int)sink & 0;
}
