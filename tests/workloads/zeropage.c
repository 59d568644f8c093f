/*
 * zeropage.c - a forked program whose page tables hold zero-page PTEs next to
 * ordinary pages, for tests/root/accuracy/test_zero_pages.py.
 *
 * Usage: zeropage
 *
 * Reading a never-written page of private anonymous memory maps the shared
 * zero page (read-only) instead of allocating one: the PTE is present, smaps
 * does not count it (vm_normal_page() is NULL), /proc/kpageflags marks its PFN
 * KPF_ZERO_PAGE. This program makes such PTEs
 *   - in libc's bss (the anonymous rw-p mapping right after libc's file-backed
 *     data segment): it reads every page of it, so the pages libc never wrote
 *     map the zero page, between the ones it did write;
 *   - in a private anonymous region of REGION_PAGES pages: every 4th page
 *     written, the others only read (zero pages within a few pages of resident
 *     ones);
 *   - in a 2 MiB-aligned MADV_HUGEPAGE region that is only read: the huge zero
 *     page, mapped by a PMD, where THP is available (else small zero pages);
 * then forks: the child inherits them (copy_pte_range copies zero-page PTEs
 * as they are) and writes 2 pages of the region (copy-on-write: its own).
 * Each process prints "READY <pid> <region> <bss start> <bss end> <huge>"
 * (hex addresses; bss 0 0 when not found) and stops itself with SIGSTOP, the
 * child first. The test kills the parent with SIGKILL; the child dies with it
 * (PR_SET_PDEATHSIG).
 *
 * Build: gcc -O1 -o zeropage zeropage.c
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define REGION_PAGES 64
#define HUGE_SIZE (2UL << 20)

static unsigned long bss_start, bss_end;
static char *region, *huge;

/* libc's bss: the anonymous rw-p mapping that starts where the last
 * file-backed mapping of a path containing "/libc" ends. */
static void find_libc_bss(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return;
    char line[512];
    unsigned long libc_end = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end, off, inode;
        char perms[8], dev[16], path[400] = "";
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %399s", &start, &end, perms, &off, dev,
                   &inode, path) < 6)
            continue;
        if (inode != 0 && strstr(path, "/libc")) {
            libc_end = end;
        } else if (inode == 0 && path[0] == '\0' && start == libc_end && libc_end
                   && strcmp(perms, "rw-p") == 0) {
            bss_start = start;
            bss_end = end;
            break;
        }
    }
    fclose(f);
}

static void ready(void)
{
    char line[128];
    int n = snprintf(line, sizeof line, "READY %d %lx %lx %lx %lx\n", (int)getpid(),
                     (unsigned long)region, bss_start, bss_end, (unsigned long)huge);
    if (write(1, line, (size_t)n) != n)
        _exit(3);
    raise(SIGSTOP);
}

int main(void)
{
    long page = sysconf(_SC_PAGESIZE);
    volatile char sink = 0;

    find_libc_bss();
    for (unsigned long a = bss_start; a < bss_end; a += (unsigned long)page)
        sink += *(volatile char *)a;

    region = mmap(NULL, REGION_PAGES * page, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        return 3;
    madvise(region, REGION_PAGES * page, MADV_NOHUGEPAGE);
    for (long i = 0; i < REGION_PAGES; i++) {
        if (i % 4 == 0)
            region[i * page] = (char)(i + 1);
        else
            sink += ((volatile char *)region)[i * page];
    }

    char *raw = mmap(NULL, 2 * HUGE_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return 3;
    huge = (char *)(((unsigned long)raw + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1));
    madvise(huge, HUGE_SIZE, MADV_HUGEPAGE);
    for (unsigned long off = 0; off < HUGE_SIZE; off += (unsigned long)page)
        sink += ((volatile char *)huge)[off];

    pid_t pid = fork();
    if (pid < 0)
        return 4;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        region[1 * page] = 1;      /* was the zero page: now the child's own */
        region[4 * page] = 2;      /* was shared with the parent: copied */
        ready();
        _exit(0);
    }
    int status;
    if (waitpid(pid, &status, WUNTRACED) != pid || !WIFSTOPPED(status))
        return 5;
    ready();
    return (int)sink & 0;
}
