/* memtrace --malloc (docs/malloc.md): uprobes on the two empty functions of the
 * sampler memtrace preloads into `run`'s command (memtrace/malloc/shim.c). The
 * sampler decides which allocations are sampled (by bytes); this program only
 * hands each one to user space with the user registers and a copy of the top
 * of the user stack (unwound there with CFI, as --stacks does), and each free
 * of a sampled pointer. Processes are filtered by tgid in the kernel.
 *
 * Its own BPF object (probes.py loads it next to memtrace.bpf.c), so that
 * --malloc costs the fault and syscall paths nothing.
 * Compile-time parameters (-D): MT_PAGE_SIZE, MT_MAX_TARGETS, MT_MALLOC_PAGES,
 * and MT_PY with CPython 3.11's offsets (bpf/pyframes.h) for Python frames. */
#include <uapi/linux/ptrace.h>
#include "malloc.h"

#define MT_PAGE_MASK ((u64)MT_PAGE_SIZE - 1)

BPF_HASH(malloc_targets, u32, u8, MT_MAX_TARGETS);
BPF_RINGBUF_OUTPUT(malloc_samples, MT_MALLOC_PAGES);
BPF_RINGBUF_OUTPUT(malloc_frees, 1024);     /* 4 MiB, ~130,000 frees: a lost free leaves its block outstanding */
BPF_ARRAY(malloc_counts, u64, MT_MALLOC_NCOUNTS);
/* Per CPU: the end of the last stack copy cut short by an unmapped page, and
 * its process (as memtrace.bpf.c keeps in its fault cache): a shallow main
 * thread near the top of [stack] would otherwise fail a full read first at
 * every sample, which costs a fault. */
struct mt_malloc_cut {
    u64 end;
    u64 tgid;
};
BPF_PERCPU_ARRAY(malloc_cut, struct mt_malloc_cut, 1);

static __always_inline void count(u32 which)
{
    u64 *n = malloc_counts.lookup(&which);
    if (n)
        __sync_fetch_and_add(n, 1);
}

#include "stackcopy.h"

#ifdef MT_PY
/* A process whose CPython 3.11 frames are read at its samples (probes.py
 * registers it in both BPF objects). */
BPF_HASH(py_targets, u32, struct mt_py_target, MT_MAX_TARGETS);
#include "pyframes.h"
#endif

/* memtrace_malloc_sampled(ptr, size, weight, period) */
int on_malloc_sampled(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!malloc_targets.lookup(&tgid))
        return 0;
    struct mt_malloc_sample *s = malloc_samples.ringbuf_reserve(sizeof(*s));
    if (!s) {
        count(MT_MALLOC_LOST);
        return 0;
    }
    s->tgid = tgid;
    s->ts = bpf_ktime_get_ns();
    s->ptr = PT_REGS_PARM1(ctx);
    s->size = PT_REGS_PARM2(ctx);
    s->weight = PT_REGS_PARM3(ctx);
    s->period = PT_REGS_PARM4(ctx);
    s->ip = ctx->ip;
    s->sp = ctx->sp;
    s->bp = ctx->bp;
    u32 zero = 0;
    struct mt_malloc_cut *cut = malloc_cut.lookup(&zero);     /* never NULL: one slot per CPU */
    s->len = s->sp && cut ? copy_stack(&cut->end, &cut->tgid, tgid, s->stack, s->sp) : 0;
    if (!s->len)
        count(MT_MALLOC_UNREAD);
    s->py_count = 0;
    s->py_flags = 0;
#ifdef MT_PY
    struct mt_py_target *py = py_targets.lookup(&tgid);
    if (py)
        PY_WALK(s, py->runtime);
#endif
    malloc_samples.ringbuf_submit(s, 0);
    return 0;
}

/* memtrace_malloc_freed(ptr) */
int on_malloc_freed(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!malloc_targets.lookup(&tgid))
        return 0;
    struct mt_malloc_free *f = malloc_frees.ringbuf_reserve(sizeof(*f));
    if (!f) {
        count(MT_MALLOC_FREES_LOST);
        return 0;
    }
    f->tgid = tgid;
    f->pad = 0;
    f->ts = bpf_ktime_get_ns();
    f->ptr = PT_REGS_PARM1(ctx);
    malloc_frees.ringbuf_submit(f, 0);
    return 0;
}
