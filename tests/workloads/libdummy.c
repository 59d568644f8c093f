/*
 * libdummy.c - a small shared library for the dlopen scenario.
 *
 * It carries a few hundred KiB of .data, .bss and .rodata; dummy_touch()
 * touches one byte per page of each, so that loading, touching and unloading
 * the library changes the process's file-backed and anonymous memory.
 *
 * Build: gcc -O1 -shared -fPIC -o libdummy.so libdummy.c
 */
#define PAGE 4096

/* volatile: the stores must not be optimised away */
static volatile char bss_area[384 * 1024];
volatile char data_area[192 * 1024] = {1};
const char ro_area[128 * 1024] = {2};

long dummy_touch(void)
{
    long sum = 0;
    for (unsigned long i = 0; i < sizeof bss_area; i += PAGE) {
        bss_area[i] = (char)i;
        sum += bss_area[i];
    }
    for (unsigned long i = 0; i < sizeof data_area; i += PAGE) {
        data_area[i]++;
        sum += data_area[i];
    }
    for (unsigned long i = 0; i < sizeof ro_area; i += PAGE)
        sum += ((const volatile char *)ro_area)[i];
    return sum;
}
