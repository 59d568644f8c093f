/* --malloc: records of the uprobes on the preloaded sampler's probed functions
 * (bpf/malloc.bpf.c; memtrace/trace/mallocevents.py mirrors them with ctypes). */
#ifndef MEMTRACE_MALLOC_H
#define MEMTRACE_MALLOC_H

#include "memtrace.h"               /* MT_STACK_COPY */

/* A sampled allocation, with what unwinding its user stack needs (as
 * struct mt_stack_sample): `len` bytes of `stack` hold user memory [sp, sp + len). */
struct mt_malloc_sample {
    u32 tgid;
    u32 len;
    u64 ts;                         /* bpf_ktime_get_ns: orders allocations and frees */
    u64 ptr;
    u64 size;                       /* bytes requested */
    u64 weight;                     /* bytes the sample stands for, from the sampler */
    u64 period;                     /* the mean gap it ended (the sampler's rate cap may raise it) */
    u64 ip;                         /* user registers at memtrace_malloc_sampled */
    u64 sp;
    u64 bp;
    /* CPython 3.11 frames of the allocating thread, as in mt_stack_sample */
    u32 py_count;
    u32 py_flags;                   /* MT_PY_* */
    u64 py_code[MT_PY_FRAMES];
    u64 py_instr[MT_PY_FRAMES];
    u8 stack[MT_STACK_COPY];
};

/* A sampled pointer freed (or moved by realloc). */
struct mt_malloc_free {
    u32 tgid;
    u32 pad;
    u64 ts;
    u64 ptr;
};

/* Counters, one slot each in the array malloc_counts. */
enum mt_malloc_count {
    MT_MALLOC_LOST = 0,             /* allocations that did not fit their ring */
    MT_MALLOC_FREES_LOST,           /* frees that did not fit their ring */
    MT_MALLOC_UNREAD,               /* allocations delivered without stack bytes */
    MT_MALLOC_NCOUNTS,
};

#endif
