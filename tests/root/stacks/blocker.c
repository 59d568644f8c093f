/* main -> outer -> inner -> a libc call that blocks: read() on stdin (a pipe
   nobody writes) or usleep(). Built -O2 -fomit-frame-pointer; every call is
   followed by work on its result, so that none becomes a tail call.
   Mode "signal": inner raises SIGUSR1, whose handler blocks in read(): the
   unwinder must cross glibc's signal trampoline (__restore_rt). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int mode_sleep, mode_signal;
static volatile long handled;

__attribute__((noinline)) static void on_usr1(int sig)
{
    char c = 0;
    handled += read(0, &c, 1) + sig + c;
}

__attribute__((noinline)) long inner(int fd)
{
    char buf[512];
    ssize_t n;
    if (mode_signal) {
        raise(SIGUSR1);
        n = handled;
        buf[0] = 1;
    } else if (mode_sleep) {
        usleep(60 * 1000 * 1000);
        n = 1;
        buf[0] = 2;
    } else {
        n = read(fd, buf, sizeof buf);
    }
    return n + buf[0];
}

__attribute__((noinline)) long outer(int fd)
{
    char big[2048];
    memset(big, fd + 1, sizeof big);
    long r = inner(fd);
    return r + big[r & 2047];
}

int main(int argc, char **argv)
{
    mode_sleep = argc > 1 && strcmp(argv[1], "sleep") == 0;
    mode_signal = argc > 1 && strcmp(argv[1], "signal") == 0;
    signal(SIGUSR1, on_usr1);
    printf("READY\n");
    fflush(stdout);
    long r = outer(0);
    printf("%ld\n", r);
    return 0;
}
