/* Structures shared between the BPF program (memtrace.bpf.c) and user space
 * (memtrace/trace/events.py mirrors them with ctypes; keep both in step). */
#ifndef MEMTRACE_H
#define MEMTRACE_H

#define MT_CHUNK_SHIFT 21           /* dirty-tracking granule: 2 MiB, one PMD */
#define MT_INLINE_CHUNKS 4          /* ranges up to this many chunks are marked in BPF */
#define MT_USER_ADDR_MAX 0x00007ffffffff000ULL

/* Syscall classes counted per process (index into mt_stats arrays). */
enum mt_syscall {
    MT_SYS_BRK = 0,
    MT_SYS_MMAP,
    MT_SYS_MUNMAP,
    MT_SYS_MREMAP,
    MT_SYS_MADVISE,
    MT_SYS_MPROTECT,
    MT_SYS_MLOCK,
    MT_SYS_MUNLOCK,
    MT_SYS_SHMAT,
    MT_SYS_SHMDT,
    MT_SYS_OTHER,                   /* remap_file_pages, prctl(PR_SET_VMA) */
    MT_SYS_EXEC,
    MT_NSYS,
};
/* Array slots for the classes: a power of two, so that an index masked with
 * (MT_NSYS_SLOTS - 1) is provably in bounds for every verifier (6.1's too). */
#define MT_NSYS_SLOTS 16

struct mt_chunk_key {
    u32 tgid;
    u32 epoch;                      /* the process's execs so far (low 32 bits of exec_gen):
                                       marks of an image and of the one it exec'd apart */
    u64 chunk;                      /* address >> MT_CHUNK_SHIFT */
};

struct mt_chunk_val {
    u64 faults;                     /* user + kernel page faults in this chunk */
    u64 last_addr;                  /* address of the latest fault */
};

/* Per-CPU cache of the last chunk a watched process faulted in: repeated faults
 * in one chunk only count here until user space drains (drain generation) or
 * a watched process execs (exec count). */
struct mt_fault_cache {
    u32 tgid;
    u32 epoch;                      /* of the cached process, as in mt_chunk_key */
    u64 chunk;
    u64 gen;
    u64 execs;                      /* exec_count when the slot was filled */
    u64 pending;                    /* faults not yet added to the dirty map */
    u64 last_addr;
    /* --stacks (MT_STACKS): bytes left until this CPU takes its next sample, and
     * whether a gap was drawn yet (a fresh slot draws one instead of sampling) */
    s64 sample_left;
    u64 sample_armed;
    /* --stacks: the end of the last stack copy cut short by an unmapped page
     * (the top of a stack mapping), and its process */
    u64 stack_end;
    u64 stack_tgid;
};

/* Per-process counters; only BPF writes them (atomic adds), user space reads. */
struct mt_stats {
    u64 calls[MT_NSYS_SLOTS];
    u64 bytes[MT_NSYS_SLOTS];
    u64 layout_gen;                 /* bumped by every call that may change the VMA list */
    u64 exec_gen;                   /* bumped by a successful execve: a new address space */
    u64 remote_rss;                 /* RSS changes of this mm made from another context */
    u64 full_rescan_requests;       /* calls whose effect cannot be bounded (mlockall...) */
    u64 ranges_lost;                /* range records that did not fit the ring buffer */
    u64 events_lost;                /* event records that did not fit the ring buffer */
    u64 events_sampled_out;         /* event records skipped because the budget was spent */
    u64 brk;                        /* last program break seen */
    u64 forks;                      /* clone/fork calls without CLONE_VM (copy-on-write children) */
    u64 stacks_sampled;             /* --stacks: faults sampled (delivered or not) */
    u64 stacks_lost;                /* --stacks: samples that did not fit the ring buffer */
    u64 stacks_unread;              /* --stacks: samples delivered without any stack bytes */
    u64 file_cuts;                  /* truncate/ftruncate/fallocate calls that succeeded */
    /* --stacks: the last release record of this process (mt_stack_release) and
     * stacks_sampled when it was sent: a release inside it with no sample since
     * has nothing left to take back and is not sent again (mmap churn) */
    u64 rel_start;
    u64 rel_end;
    u64 rel_seen;
};

/* Arguments of an address-space syscall in flight, per thread. */
#define MT_IN_NO_RESCAN 1           /* an MT_SYS_OTHER call whose effect needs no rescan */
#define MT_IN_LIVE 2                /* stashed at enter, not yet finished at exit */
struct mt_inflight {
    u64 args[5];
    u32 sys;
    u32 nr;                         /* __syscall_nr of its tracepoint record */
    u32 flags;                      /* MT_IN_* */
    u32 pad;
};

/* A range too large to mark inline: user space rescans it. */
struct mt_range {
    u32 tgid;
    u32 pad;
    u64 start;
    u64 end;
};

/* One address-space syscall, streamed for the event log. */
struct mt_event {
    u64 ts_ns;
    u32 tgid;
    u32 tid;
    u32 sys;                        /* enum mt_syscall */
    u32 nr;                         /* syscall number (the tracepoint's __syscall_nr) */
    s64 ret;
    u64 args[5];
};

/* --stacks: one sampled page fault with what unwinding its user stack needs.
 * The record has a fixed size (ringbuf_reserve); `len` says how much of
 * `stack` holds user memory [sp, sp + len). */
#ifndef MT_STACK_COPY
#define MT_STACK_COPY 8192          /* bytes of user stack copied from sp; a power of two */
#endif
#define MT_STACK_GAPS 4096          /* pre-drawn exponential gaps, filled by user space */
#define MT_PY_FRAMES 32             /* CPython frames read per sample, innermost first */
#define MT_PY_THREADS 64            /* thread states searched for the faulting thread's */
#define MT_PY_TRUNCATED 1           /* py_flags: more frames than MT_PY_FRAMES */
#define MT_PY_NO_THREAD 2           /* py_flags: a registered process, but no thread state
                                       of the faulting thread found (or unreadable) */
#define MT_PY_READ 4                /* py_flags: the frames were read (maybe 0 of them) */
#define MT_STACK_FROM_KERNEL 1      /* flags: a kernel-mode fault (read() into a fresh
                                       buffer...): the registers are the user's at
                                       syscall entry */
#define MT_STACK_FORCED 2           /* flags: the first fault in a chunk of a process whose
                                       faults may map a huge page, sampled outside the
                                       countdown: it stands for what it made resident */
#define MT_STACK_RELEASE 4          /* flags: not a sample but a release (mt_stack_release) */
#define MT_HUGE_CHUNKS 65536        /* chunks force-sampled and still resident, all targets */
struct mt_stack_sample {
    u32 tgid;
    u32 epoch;                      /* as in mt_chunk_key */
    u64 addr;                       /* the faulting address */
    u64 ip;                         /* user registers at the fault (or at syscall entry) */
    u64 sp;
    u64 bp;
    u32 len;                        /* bytes of stack copied: MT_STACK_COPY, less near the
                                       top of a stack mapping, 0 when unreadable */
    u32 flags;                      /* MT_STACK_* */
    /* CPython 3.11 frames of the faulting thread (registered processes only):
     * innermost first, the code object's address | 1 for an entry frame (the
     * first of a _PyEval_EvalFrameDefault call), and py_instr_word's word:
     * prev_instr's offset in the code object | its fingerprint << 32 */
    u32 py_count;
    u32 py_flags;                   /* MT_PY_* */
    u64 py_code[MT_PY_FRAMES];
    u64 py_instr[MT_PY_FRAMES];
    u8 stack[MT_STACK_COPY];
};

/* --stacks: pages a call gave back (munmap, MAP_FIXED over a mapping, madvise
 * DONTNEED/FREE/REMOVE, a shrinking brk or mremap) or moved (mremap to a new
 * address), sent in the samples' ring so that user space sees them in order
 * with the samples: a sample taken before its page was given back no longer
 * holds it, even when the address is faulted again before the next profile.
 * The first fields are mt_stack_sample's, flags MT_STACK_RELEASE. */
struct mt_stack_release {
    u32 tgid;
    u32 epoch;
    u64 start;                      /* [start, end) given back, or moved... */
    u64 end;
    u64 to;                         /* ... to [to, to_end) (mremap); 0 when given back */
    u64 to_end;
    u32 len;                        /* 0 */
    u32 flags;                      /* MT_STACK_RELEASE */
};

/* A process whose CPython 3.11 frames are read at its samples (user space
 * found _PyRuntime in its executable or libpython). */
struct mt_py_target {
    u64 runtime;                    /* address of _PyRuntime */
    u32 epoch;                      /* the image it was found in (as mt_chunk_key) */
    u32 pad;
};

#endif
