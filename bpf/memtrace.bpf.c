/* memtrace BPF side: marks the 2 MiB chunks whose resident pages may have
 * changed, counts faults and address-space syscalls per process, and streams
 * the rare syscall records. Reads tracepoint arguments only (plus, for the raw
 * rss_stat probe, task_struct.mm at an offset taken from BTF at run time), so
 * it compiles correctly against mismatched kernel headers.
 *
 * Compile-time parameters (-D): MT_PAGE_SIZE (the running system's, from
 * sysconf), MT_MAX_TARGETS, MT_MAX_CHUNKS, MT_RANGES_PAGES, MT_EVENTS_PAGES,
 * and optionally MT_TASK_MM_OFFSET,
 * MT_NO_RSS_STAT (no rss_stat probe: user space relies on an exact statm),
 * MT_NO_EVENT_STREAM (no syscall records streamed: no view shows them) and
 * MT_STACKS with MT_STACKS_PAGES (--stacks: sampled faults with user stacks;
 * MT_STACKS_KERNEL also samples kernel-mode faults, through BTF helpers).
 *
 * Longer than 600 lines: BCC compiles one source file into one BPF object whose
 * maps every program shares (targets, dirty chunks, stats, rings), so the fault,
 * syscall, exec/fork and stack programs live in this one file. */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#ifndef MT_PAGE_SIZE
#error "MT_PAGE_SIZE: memtrace/trace/probes.py passes the system's page size (-DMT_PAGE_SIZE=...)"
#endif
#define MT_PAGE_MASK ((u64)MT_PAGE_SIZE - 1)

/* tgid -> its epoch: execs since user space added it (equals the low 32 bits of
 * its stats.exec_gen); dirty chunks are keyed by it so that the faults of an
 * image and of the one it exec'd into stay apart within one drain. */
BPF_HASH(targets, u32, u32, MT_MAX_TARGETS);
BPF_HASH(stats, u32, struct mt_stats, MT_MAX_TARGETS);
BPF_HASH(event_credit, u32, s64, MT_MAX_TARGETS);
/* Dirty chunks, double-buffered by the parity of drain_gen: BPF writes the
 * current generation's map while user space drains the other one, after an
 * RCU grace period has let every program that saw the old generation finish,
 * so no count is added to an entry that is being deleted. */
BPF_HASH(dirty0, struct mt_chunk_key, struct mt_chunk_val, MT_MAX_CHUNKS);
BPF_HASH(dirty1, struct mt_chunk_key, struct mt_chunk_val, MT_MAX_CHUNKS);
/* tid -> its call in flight. An entry stays while its thread lives (removed at
 * the thread's exit) and is rewritten in place by the thread's next call: a
 * lookup and a few stores instead of a hash update at every enter and a delete
 * at every exit. */
BPF_HASH(inflight, u32, struct mt_inflight, 16384);
/* Per-CPU fault cache, one slot per generation parity (user space reads the
 * old generation's slot after the grace period; BPF resets it two
 * generations later). */
BPF_PERCPU_ARRAY(fault_cache, struct mt_fault_cache, 2);
BPF_ARRAY(drain_gen, u64, 1);                  /* bumped by user space before each drain */
BPF_ARRAY(exec_count, u64, 1);                 /* bumped by every exec of a target: a cached
                                                  chunk of the old image is not the new one's */
/* The last process this CPU's fault path found not to be a target, valid while
 * targets_gen (bumped by user space after each target it adds) is unchanged:
 * faults of other processes come in runs, and an array read is cheaper than
 * the hash lookup in targets. */
struct mt_not_target {
    u32 tgid;
    u32 pad;
    u64 targets_gen;
};
BPF_ARRAY(targets_gen, u64, 1);
BPF_PERCPU_ARRAY(not_target, struct mt_not_target, 1);
BPF_HASH(mm_owner, u64, u32, MT_MAX_TARGETS);   /* mm -> tgid */
BPF_HASH(tgid_mm, u32, u64, MT_MAX_TARGETS);   /* tgid -> its current mm */
BPF_ARRAY(names_gen, u64, 1);                  /* bumped by any unlink or rename */
BPF_ARRAY(stats_zero, struct mt_stats, 1);     /* never written: a process's first stats
                                                  (368 bytes: too many for the stack) */
BPF_RINGBUF_OUTPUT(ranges, MT_RANGES_PAGES);
BPF_RINGBUF_OUTPUT(events, MT_EVENTS_PAGES);
#ifdef MT_WATCH_EXECS
BPF_RINGBUF_OUTPUT(execs, 16);                  /* agent mode: every exec on the system */
BPF_RINGBUF_OUTPUT(forks, 16);                  /* agent mode: children of watched processes */
BPF_ARRAY(notices_lost, u64, 2);                /* agent mode: [0] execs, [1] forks not streamed */
#endif

#ifdef MT_STACKS
/* --stacks: faults are sampled by bytes. Each CPU counts the bytes of watched
 * processes' faults (MT_PAGE_SIZE each) down from a gap drawn from an
 * exponential distribution; the fault that exhausts it is sampled and the
 * next gap is drawn. Exponential gaps are memoryless, so one countdown per CPU
 * shared by every watched process samples each process's faults as its own
 * countdown would (docs/stacks.md). BPF has no floating point: user space
 * fills stack_gaps with the distribution's quantiles and BPF draws an index. */
BPF_ARRAY(stack_gaps, u64, MT_STACK_GAPS);
BPF_RINGBUF_OUTPUT(stack_samples, MT_STACKS_PAGES);
#define MT_STACKS_WAKE 256      /* about a quarter of the ring at its default size */

/* Offsets in the x86-64 uapi struct pt_regs (asm/ptrace.h: r15 r14 r13 r12
 * rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss):
 * an ABI, the same in every kernel. */
#define MT_REGS_BP 32
#define MT_REGS_IP 128
#define MT_REGS_SP 152

static __always_inline u64 read_reg(u64 regs, u64 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(regs + off));
    return v;
}

#include "stackcopy.h"
#ifdef MT_PY
#include "pyframes.h"
BPF_HASH(py_targets, u32, struct mt_py_target, MT_MAX_TARGETS);

/* Fill s->py_* for a registered process of this image (else leave them 0). */
static __always_inline void py_frames(struct mt_stack_sample *s, u32 tgid, u32 epoch)
{
    struct mt_py_target *py = py_targets.lookup(&tgid);
    if (py && py->epoch == epoch)
        PY_WALK(s, py->runtime);
}
#endif

static __always_inline void take_sample(struct mt_fault_cache *fc, u32 tgid, u32 epoch, u64 addr,
                                        u64 regs, u32 flags)
{
    struct mt_stats *st = stats.lookup(&tgid);
    u64 nth = st ? __sync_fetch_and_add(&st->stacks_sampled, 1) : 0;
    struct mt_stack_sample *s = stack_samples.ringbuf_reserve(sizeof(*s));
    if (!s) {
        if (st)
            __sync_fetch_and_add(&st->stacks_lost, 1);
        return;
    }
    s->tgid = tgid;
    s->epoch = epoch;
    s->addr = addr;
    s->flags = flags;
    s->ip = regs ? read_reg(regs, MT_REGS_IP) : 0;
    s->sp = regs ? read_reg(regs, MT_REGS_SP) : 0;
    s->bp = regs ? read_reg(regs, MT_REGS_BP) : 0;
    s->len = s->sp ? copy_stack(&fc->stack_end, &fc->stack_tgid, tgid, s->stack, s->sp) : 0;
    s->py_count = 0;
    s->py_flags = 0;
#ifdef MT_PY
    py_frames(s, tgid, epoch);
#endif
    if (!s->len && st)
        __sync_fetch_and_add(&st->stacks_unread, 1);
    /* Records wake nobody, but every MT_STACKS_WAKE-th of a process wakes
     * user space's reader (probes.py), so that a burst of faults between two
     * drains does not fill the ring: one wakeup per MT_STACKS_WAKE samples. */
    stack_samples.ringbuf_submit(s, nth % MT_STACKS_WAKE == MT_STACKS_WAKE - 1
                                     ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* The user registers of a fault: the tracepoint's regs for a user-mode fault;
 * for a kernel-mode one, the task's saved user registers (BTF helpers). */
static __always_inline u64 user_regs(u64 tp_regs, u32 flags)
{
    if (!(flags & MT_STACK_FROM_KERNEL))
        return tp_regs;
#ifdef MT_STACKS_KERNEL
    return (u64)bpf_task_pt_regs(bpf_get_current_task_btf());
#else
    return 0;
#endif
}

/* A huge page is always sampled. The fault tracepoint fires before the kernel
 * chooses the page size, so in a process whose faults may map a transparent
 * huge page (huge_targets: THP "always", or it asked for MADV_HUGEPAGE) the
 * first fault of a chunk in a generation is sampled outside the countdown
 * (MT_STACK_FORCED), once per chunk until user space finds the chunk empty
 * again and deletes its huge_chunks entry. User space weighs such a sample
 * by what it made resident: a huge page, or one page (docs/stacks.md). */
BPF_HASH(huge_targets, u32, u8, MT_MAX_TARGETS);
BPF_TABLE("lru_hash", struct mt_chunk_key, u8, huge_chunks, MT_HUGE_CHUNKS);

static __always_inline int huge_first(u32 tgid, u32 epoch, u64 addr)
{
    if (!huge_targets.lookup(&tgid))
        return 0;
    struct mt_chunk_key key = {.tgid = tgid, .epoch = epoch, .chunk = addr >> MT_CHUNK_SHIFT};
    u8 one = 1;
    /* fails when the chunk was sampled already (or the table is full, and
     * the countdown decides) */
    return huge_chunks.insert(&key, &one) == 0;
}

/* Count one fault down on this CPU's countdown (kept in its fault-cache slot,
 * which the fault path has looked up already); sample when it runs out.
 * `first`: the first fault of its chunk in this generation (see above). */
static __always_inline void count_down(struct mt_fault_cache *fc, u32 tgid, u32 epoch, u64 addr,
                                       u64 tp_regs, u32 flags, int first)
{
#ifndef MT_STACKS_KERNEL
    if (flags & MT_STACK_FROM_KERNEL)
        return;     /* no way to the user registers: not counted (docs/stacks.md) */
#endif
    if (first && huge_first(tgid, epoch, addr)) {
        flags |= MT_STACK_FORCED;       /* sampled outside the countdown */
    } else {
        fc->sample_left -= MT_PAGE_SIZE;
        if (fc->sample_left > 0)
            return;
        u32 i = bpf_get_prandom_u32() & (MT_STACK_GAPS - 1);
        u64 *gap = stack_gaps.lookup(&i);
        u64 armed = fc->sample_armed;
        /* an empty table (user space not ready) takes no sample and arms nothing */
        fc->sample_left = gap ? (s64)*gap : 0;
        fc->sample_armed = fc->sample_left > 0;
        if (!armed)
            return;
    }
    take_sample(fc, tgid, epoch, addr, user_regs(tp_regs, flags), flags);
}
#define COUNT_DOWN(fc, tgid, epoch, addr, regs, flags, first) \
    count_down(fc, tgid, epoch, addr, regs, flags, first)
#else
#define COUNT_DOWN(fc, tgid, epoch, addr, regs, flags, first) do { (void)(first); } while (0)
#endif

#define MT_GEN_NONE (~0ULL)     /* no drain generation: a fault-cache slot being rewritten */

static __always_inline int is_target(u32 tgid)
{
    return targets.lookup(&tgid) != NULL;
}

/* targets' value for tgid (its epoch), or NULL; remembers a miss per CPU. */
static __always_inline u32 *target_epoch(u32 tgid)
{
    int zero = 0;
    u64 *tg = targets_gen.lookup(&zero);
    u64 gen = tg ? *tg : 0;
    struct mt_not_target *nt = not_target.lookup(&zero);
    if (nt && nt->tgid == tgid && nt->targets_gen == gen)
        return NULL;
    u32 *epoch = targets.lookup(&tgid);
    if (!epoch && nt) {
        nt->tgid = tgid;
        nt->targets_gen = gen;
    }
    return epoch;
}

static __always_inline u64 current_gen(void)
{
    int zero = 0;
    u64 *gen = drain_gen.lookup(&zero);
    return gen ? *gen : 0;
}

static __always_inline u64 current_execs(void)
{
    int zero = 0;
    u64 *n = exec_count.lookup(&zero);
    return n ? *n : 0;
}

/* Returns 1 when `faults` are the first of this chunk in this generation. */
static __always_inline int mark_chunk(u32 tgid, u32 epoch, u64 addr, u64 faults, u64 gen)
{
    struct mt_chunk_key key = {.tgid = tgid, .epoch = epoch, .chunk = addr >> MT_CHUNK_SHIFT};
    struct mt_chunk_val zero = {};
    struct mt_chunk_val *val;
    if (gen & 1)
        val = dirty1.lookup_or_try_init(&key, &zero);
    else
        val = dirty0.lookup_or_try_init(&key, &zero);
    if (!val) {
        /* Map full: ask for a full rescan rather than lose the change. */
        struct mt_stats *st = stats.lookup(&tgid);
        if (st)
            __sync_fetch_and_add(&st->full_rescan_requests, 1);
        return 0;
    }
    if (!faults)
        return 0;
    int first = val->faults == 0;
    __sync_fetch_and_add(&val->faults, faults);
    val->last_addr = addr;
    return first;
}

static __always_inline void on_fault(u64 addr, u64 regs, u32 flags)
{
    if (addr >= MT_USER_ADDR_MAX)
        return;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 chunk = addr >> MT_CHUNK_SHIFT;
    u64 gen = current_gen();
    u64 execs = current_execs();
    int slot = gen & 1;
    struct mt_fault_cache *fc = fault_cache.lookup(&slot);
    u32 *epoch;
    if (!fc) {
        epoch = targets.lookup(&tgid);
        if (epoch)
            mark_chunk(tgid, *epoch, addr, 1, gen);
        return;
    }
    /* Fast path: this CPU already marked this chunk in this generation, and no
     * target has exec'd since (the same tgid and address may be a new image). */
    if (fc->gen == gen && fc->execs == execs && fc->tgid == tgid && fc->chunk == chunk) {
        fc->pending++;
        fc->last_addr = addr;
        COUNT_DOWN(fc, tgid, fc->epoch, addr, regs, flags, 0);
        return;
    }
    epoch = target_epoch(tgid);
    if (!epoch)
        return;
    /* A slot of an older generation was collected by user space already. */
    if (fc->gen == gen && fc->pending)
        mark_chunk(fc->tgid, fc->epoch, fc->last_addr, fc->pending, gen);
    u32 ep = *epoch;
    int first = mark_chunk(tgid, ep, addr, 1, gen);
    /* Invalid while it is rewritten: a program that preempts this one on this
     * CPU (a preemptible kernel) must not take a half-written slot for a
     * marked chunk (mark_range skips chunks the slot names). */
    fc->gen = MT_GEN_NONE;
    asm volatile("" ::: "memory");
    fc->tgid = tgid;
    fc->epoch = ep;
    fc->chunk = chunk;
    fc->execs = execs;
    fc->pending = 0;
    fc->last_addr = addr;
    asm volatile("" ::: "memory");
    fc->gen = gen;
    COUNT_DOWN(fc, tgid, ep, addr, regs, flags, first);
}

/* Raw tracepoints: the handler gets the tracepoint's arguments
 * (address, regs, error_code) without the cost of building a trace record. */
RAW_TRACEPOINT_PROBE(page_fault_user)
{
    on_fault(ctx->args[0], ctx->args[1], 0);
    return 0;
}

/* Kernel-mode faults on user addresses: read() into a fresh buffer, etc. (its
 * regs are the kernel's: --stacks finds the user's elsewhere) */
RAW_TRACEPOINT_PROBE(page_fault_kernel)
{
    on_fault(ctx->args[0], 0, MT_STACK_FROM_KERNEL);
    return 0;
}

/* Mark [start, end): inline when small, else hand the range to user space. */
static __always_inline void mark_range(u32 tgid, struct mt_stats *st, u64 start, u64 end)
{
    if (end <= start || start >= MT_USER_ADDR_MAX)
        return;
    if (end > MT_USER_ADDR_MAX)
        end = MT_USER_ADDR_MAX;
    u32 epoch = (u32)st->exec_gen;
    u64 first = start >> MT_CHUNK_SHIFT;
    u64 last = (end - 1) >> MT_CHUNK_SHIFT;
    if (last - first < MT_INLINE_CHUNKS) {
        u64 gen = current_gen();
        int slot = gen & 1;
        struct mt_fault_cache *fc = fault_cache.lookup(&slot);
#pragma unroll
        for (int i = 0; i < MT_INLINE_CHUNKS; i++) {
            if (first + i > last)
                break;
            /* This CPU's last fault marked this chunk in this generation (the
             * churn of mmap, touch, munmap): its entry is in the map already. */
            if (fc && fc->gen == gen && fc->tgid == tgid && fc->epoch == epoch &&
                fc->chunk == first + i)
                continue;
            mark_chunk(tgid, epoch, (first + i) << MT_CHUNK_SHIFT, 0, gen);
        }
        return;
    }
    struct mt_range *r = ranges.ringbuf_reserve(sizeof(*r));
    if (!r) {
        __sync_fetch_and_add(&st->ranges_lost, 1);
        return;
    }
    r->tgid = tgid;
    r->pad = 0;
    r->start = start;
    r->end = end;
    ranges.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

static __always_inline void learn_mm(u64 mm)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return;
    u64 *known = tgid_mm.lookup(&tgid);
    if (known && *known == mm)
        return;
    tgid_mm.update(&tgid, &mm);
    mm_owner.update(&mm, &tgid);
}

static __always_inline void remote_change(u64 mm)
{
    u32 *owner = mm_owner.lookup(&mm);
    if (!owner)
        return;
    u32 o = *owner;
    u64 *current_mm = tgid_mm.lookup(&o);
    if (!current_mm || *current_mm != mm) {
        /* The mm of a process before exec, or a freed and reused pointer. */
        mm_owner.delete(&mm);
        return;
    }
    struct mt_stats *st = stats.lookup(&o);
    if (st)
        __sync_fetch_and_add(&st->remote_rss, 1);
}

static __always_inline void learn_current_mm(void)
{
#if defined(MT_TASK_MM_OFFSET) && !defined(MT_NO_RSS_STAT)
    /* A watched process's own address-space calls tell us its mm pointer, so
     * the rss_stat probe needs no map lookup for the (frequent) own updates. */
    u64 cur_mm = 0;
    char *task = (char *)bpf_get_current_task();
    bpf_probe_read_kernel(&cur_mm, sizeof(cur_mm), task + MT_TASK_MM_OFFSET);
    if (cur_mm)
        learn_mm(cur_mm);
#endif
}

/* A call is stashed with its class (enum mt_syscall), its syscall number as the
 * tracepoint record gives it (__syscall_nr: the running system's numbering) and
 * its MT_IN_* flags. */
static __always_inline int stash(u32 sys, u32 nr, u32 flags, u64 a0, u64 a1, u64 a2, u64 a3,
                                 u64 a4)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!is_target(tgid))
        return 0;
    struct mt_inflight *cur = inflight.lookup(&tid);
    if (cur) {
        /* Only this thread writes its entry, and only between its calls. */
        cur->args[0] = a0;
        cur->args[1] = a1;
        cur->args[2] = a2;
        cur->args[3] = a3;
        cur->args[4] = a4;
        cur->sys = sys;
        cur->nr = nr;
        cur->flags = flags | MT_IN_LIVE;
        return 0;
    }
    struct mt_inflight in = {.args = {a0, a1, a2, a3, a4}, .sys = sys, .nr = nr,
                             .flags = flags | MT_IN_LIVE};
    if (inflight.update(&tid, &in) != 0) {
        /* Full: this call's range would go unmarked. */
        struct mt_stats *st = stats.lookup(&tgid);
        if (st)
            __sync_fetch_and_add(&st->full_rescan_requests, 1);
    }
    return 0;
}

static __always_inline void stream(u32 tgid, u32 tid, struct mt_inflight *in, s64 ret,
                                   struct mt_stats *st)
{
#ifdef MT_NO_EVENT_STREAM
    return;     /* no view displays the records: the counters are enough */
#endif
    s64 *credit = event_credit.lookup(&tgid);
    if (!credit || __sync_fetch_and_add(credit, -1) <= 0) {
        __sync_fetch_and_add(&st->events_sampled_out, 1);
        return;
    }
    struct mt_event *ev = events.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        __sync_fetch_and_add(&st->events_lost, 1);
        return;
    }
    ev->ts_ns = bpf_ktime_get_ns();
    ev->tgid = tgid;
    ev->tid = tid;
    ev->sys = in->sys;
    ev->nr = in->nr;
    ev->ret = ret;
#pragma unroll
    for (int i = 0; i < 5; i++)
        ev->args[i] = in->args[i];
    events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

#define MADV_WILLNEED 3
#define MADV_DONTNEED 4
#define MADV_FREE 8
#define MADV_REMOVE 9
#define MADV_COLD 20
#define MADV_PAGEOUT 21
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#define MADV_DONTNEED_LOCKED 24
#define MADV_COLLAPSE 25
#define MADV_HUGEPAGE 14

static __always_inline int madvise_keeps_layout(u64 advice)
{
    switch (advice) {
    case MADV_WILLNEED: case MADV_DONTNEED: case MADV_FREE: case MADV_REMOVE:
    case MADV_COLD: case MADV_PAGEOUT: case MADV_POPULATE_READ:
    case MADV_POPULATE_WRITE: case MADV_DONTNEED_LOCKED: case MADV_COLLAPSE:
        return 1;
    }
    return 0;
}

/* Advice after which the pages' next fault is a new use of the address */
static __always_inline int madvise_gives_back(u64 advice)
{
    return advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE ||
           advice == MADV_DONTNEED_LOCKED;
}

#ifdef MT_STACKS
/* Tell user space, in order with the samples, that [start, end) was given
 * back (or moved to [to, to_end)): the samples taken there before no longer
 * hold those pages (docs/stacks.md, "Netting"). Not sent for a process
 * never sampled, nor again for a range inside the last one sent when no
 * sample of the process was taken since (the same buffer mapped, touched and
 * unmapped over and over) — a move always is. */
static __always_inline void release_samples(u32 tgid, struct mt_stats *st, u64 start, u64 end,
                                            u64 to, u64 to_end)
{
    u64 seen = st->stacks_sampled;
    if (end <= start || !seen)
        return;
    if (!to && seen == st->rel_seen && start >= st->rel_start && end <= st->rel_end)
        return;
    struct mt_stack_release *r = stack_samples.ringbuf_reserve(sizeof(*r));
    if (!r) {
        __sync_fetch_and_add(&st->stacks_lost, 1);
        return;
    }
    r->tgid = tgid;
    r->epoch = (u32)st->exec_gen;
    r->start = start;
    r->end = end;
    r->to = to;
    r->to_end = to_end;
    r->len = 0;
    r->flags = MT_STACK_RELEASE;
    stack_samples.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    st->rel_start = start;
    st->rel_end = end;
    st->rel_seen = seen;
}
#endif

#define MT_MAP_FIXED 0x10
#define MT_MREMAP_FIXED 2

static __always_inline u64 page_up(u64 x) { return (x + MT_PAGE_MASK) & ~MT_PAGE_MASK; }

static __always_inline int finish(s64 ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct mt_inflight *in = inflight.lookup(&tid);
    if (!in || !(in->flags & MT_IN_LIVE))
        return 0;
    int zero_key = 0;
    struct mt_stats *zero = stats_zero.lookup(&zero_key);
    if (!zero) {
        in->flags = 0;
        return 0;
    }
    struct mt_stats *st = stats.lookup_or_try_init(&tgid, zero);
    if (!st) {
        in->flags = 0;
        return 0;
    }
    learn_current_mm();
    u32 sys = in->sys;
    u64 a0 = in->args[0], a1 = in->args[1], a2 = in->args[2];
    u64 bytes = 0;
    int layout = 1;
    int ok = ret >= 0;
    /* The (at most two) ranges the call may have changed, marked once below:
     * one inlined mark_range per call site made finish_exit 4,000 instructions
     * and most of the compile. An empty range marks nothing. */
    u64 start0 = 0, end0 = 0, start1 = 0, end1 = 0;
    /* --stacks: what the call gave back [rel0, rel1) or moved to [to0, to1) */
    u64 rel0 = 0, rel1 = 0, to0 = 0, to1 = 0;

    /* A failed call may have changed part of its range before failing (mprotect,
     * mlock or madvise over a hole: ENOMEM after the mapped part; a MAP_FIXED
     * mmap whose file refuses the mapping leaves a hole where the old mappings
     * were), so every failure counts as a layout change and marks what it may
     * have touched. Failures are rare: no map operation is added on success. */
    switch (sys) {
    case MT_SYS_MMAP:
        if (ok) {
            bytes = a1;
            start0 = (u64)ret;
            end0 = (u64)ret + page_up(a1);
        } else if (in->args[3] & MT_MAP_FIXED) {
            start0 = a0;
            end0 = a0 + page_up(a1);
        }
        if (in->args[3] & MT_MAP_FIXED) {   /* what was mapped there is gone */
            rel0 = start0;
            rel1 = end0;
        }
        break;
    case MT_SYS_MUNMAP:
        bytes = a1;
        start0 = a0;
        end0 = a0 + page_up(a1);
        if (ok) {
            rel0 = start0;
            rel1 = end0;
        }
        break;
    case MT_SYS_MPROTECT:
    case MT_SYS_MLOCK:
    case MT_SYS_MUNLOCK:
        bytes = a1;
        start0 = a0;
        end0 = a0 + page_up(a1);
        break;
    case MT_SYS_MADVISE:
        bytes = a1;
        layout = !madvise_keeps_layout(a2);
#ifdef MT_STACKS
        if (ok && a2 == MADV_HUGEPAGE) {
            u8 one = 1;
            huge_targets.update(&tgid, &one);
        }
#endif
        start0 = a0;
        end0 = a0 + page_up(a1);
        if (ok && madvise_gives_back(a2)) {
            rel0 = start0;
            rel1 = end0;
        }
        break;
    case MT_SYS_MREMAP:
        start0 = a0;
        end0 = a0 + page_up(a1);
        if (ok) {
            bytes = a2;
            start1 = (u64)ret;
            end1 = (u64)ret + page_up(a2);
            if ((u64)ret != a0) {           /* moved: the pages go with it */
                rel0 = start0;
                rel1 = end0;
                to0 = start1;
                to1 = end1;
            } else if (a2 < a1) {           /* shrunk in place */
                rel0 = a0 + page_up(a2);
                rel1 = end0;
            }
        } else if (in->args[3] & MT_MREMAP_FIXED) {
            /* the target is unmapped before the move is tried */
            start1 = in->args[4];
            end1 = in->args[4] + page_up(a2);
            rel0 = start1;
            rel1 = end1;
        }
        break;
    case MT_SYS_BRK: {
        /* brk returns the break: the one asked for on success, the old one on
         * failure (and on brk(0), which asks for nothing). */
        u64 old = st->brk, cur = (u64)ret;
        layout = 0;
        if (old && cur != old) {
            u64 lo = old < cur ? old : cur, hi = old < cur ? cur : old;
            bytes = hi - lo;
            start0 = lo & ~MT_PAGE_MASK;
            end0 = page_up(hi);
            layout = 1;
            if (cur < old) {                /* the heap shrank */
                rel0 = page_up(cur);
                rel1 = end0;
            }
        } else if (!old) {
            start0 = cur & ~MT_PAGE_MASK;
            end0 = page_up(cur) + 1;
            layout = 1;
        }
        if (a0 && cur != a0) {
            /* a failed move of the break */
            u64 lo = a0 < cur ? a0 : cur, hi = a0 < cur ? cur : a0;
            start1 = lo & ~MT_PAGE_MASK;
            end1 = page_up(hi);
            layout = 1;
        }
        st->brk = cur;
        break;
    }
    case MT_SYS_EXEC:
        /* A failed exec left the image as it was (after the point of no
         * return it does not come back). */
        layout = 0;
        if (ok) {
            __sync_fetch_and_add(&st->exec_gen, 1);     /* before the epoch: see below */
            u32 *epoch = targets.lookup(&tgid);
            if (epoch)
                __sync_fetch_and_add(epoch, 1);
            int idx = 0;
            u64 *execs = exec_count.lookup(&idx);
            if (execs)
                __sync_fetch_and_add(execs, 1);
            st->brk = 0;
        }
        break;
    case MT_SYS_SHMAT:
    case MT_SYS_SHMDT:
        /* Size unknown here; user space rescans VMAs that appear and drops
         * pages of VMAs that go. */
        break;
    case MT_SYS_OTHER:
        if (in->flags & MT_IN_NO_RESCAN) /* PR_SET_VMA renames; munlockall frees nothing */
            break;
        /* remap_file_pages, mlockall: effect not bounded by the arguments */
    default:
        __sync_fetch_and_add(&st->full_rescan_requests, 1);
        break;
    }
    mark_range(tgid, st, start0, end0);
    mark_range(tgid, st, start1, end1);
#ifdef MT_STACKS
    release_samples(tgid, st, rel0, rel1, to0, to1);
#else
    (void)rel0; (void)rel1; (void)to0; (void)to1;
#endif
    u32 slot = sys & (MT_NSYS_SLOTS - 1);
    __sync_fetch_and_add(&st->calls[slot], 1);
    __sync_fetch_and_add(&st->bytes[slot], bytes);
    if (layout)
        __sync_fetch_and_add(&st->layout_gen, 1);
    stream(tgid, tid, in, ret, st);
    in->flags = 0;      /* finished: the entry waits for the thread's next call */
    return 0;
}

/* The work of every exit is done by one program, finish_exit, tail-called from
 * each sys_exit_* probe (user space puts it in finish_prog). Inlined into each
 * of the ~20 exit probes it made the program ~60k instructions and its compile
 * most of memtrace's start-up time. Every sys_exit_* record has one layout
 * (syscall nr, ret), so finish_exit reads any of them as sys_exit_brk's. */
BPF_PROG_ARRAY(finish_prog, 1);

static __always_inline int to_finish(void *ctx)
{
    if (is_target(bpf_get_current_pid_tgid() >> 32))
        finish_prog.call(ctx, 0);
    return 0;       /* reached only when the tail call could not be made */
}

#define ENTER_FLAGS(name, sys, flags, a0, a1, a2, a3, a4) \
    TRACEPOINT_PROBE(syscalls, sys_enter_##name) \
    { return stash(sys, args->__syscall_nr, flags, (u64)(a0), (u64)(a1), (u64)(a2), \
                   (u64)(a3), (u64)(a4)); } \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return to_finish(args); }
#define ENTER(name, sys, a0, a1, a2, a3, a4) ENTER_FLAGS(name, sys, 0, a0, a1, a2, a3, a4)

ENTER(brk, MT_SYS_BRK, args->brk, 0, 0, 0, 0)
/* The layout every syscalls:sys_exit_* record shares (tracefs format: common
 * fields, then __syscall_nr at offset 8 and ret at offset 16). */
struct mt_sys_exit {
    u64 common;
    s32 syscall_nr;
    s32 pad;
    s64 ret;
};
int finish_exit(struct mt_sys_exit *args) { return finish(args->ret); }
ENTER(mmap, MT_SYS_MMAP, args->addr, args->len, args->prot, args->flags, args->fd)
ENTER(munmap, MT_SYS_MUNMAP, args->addr, args->len, 0, 0, 0)
ENTER(mremap, MT_SYS_MREMAP, args->addr, args->old_len, args->new_len, args->flags,
      args->new_addr)
ENTER(madvise, MT_SYS_MADVISE, args->start, args->len_in, args->behavior, 0, 0)
ENTER(mprotect, MT_SYS_MPROTECT, args->start, args->len, args->prot, 0, 0)
ENTER(pkey_mprotect, MT_SYS_MPROTECT, args->start, args->len, args->prot, args->pkey, 0)
ENTER(mlock, MT_SYS_MLOCK, args->start, args->len, 0, 0, 0)
ENTER(mlock2, MT_SYS_MLOCK, args->start, args->len, args->flags, 0, 0)
ENTER(munlock, MT_SYS_MUNLOCK, args->start, args->len, 0, 0, 0)
ENTER(mlockall, MT_SYS_OTHER, args->flags, 0, 0, 0, 0)
ENTER_FLAGS(munlockall, MT_SYS_OTHER, MT_IN_NO_RESCAN, 0, 0, 0, 0, 0)
ENTER(shmat, MT_SYS_SHMAT, args->shmid, args->shmaddr, args->shmflg, 0, 0)
ENTER(shmdt, MT_SYS_SHMDT, args->shmaddr, 0, 0, 0, 0)
ENTER(remap_file_pages, MT_SYS_OTHER, args->start, args->size, args->prot, args->pgoff,
      args->flags)
ENTER(execve, MT_SYS_EXEC, 0, 0, 0, 0, 0)
ENTER(execveat, MT_SYS_EXEC, 0, 0, 0, 0, 0)

/* A thread's in-flight entry goes with the thread (whether its process is
 * watched or not: it may have been). */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = args->pid;
    inflight.delete(&tid);
    return 0;
}

/* A mapped file that is deleted or renamed changes its name in maps with no
 * address-space call; any successful unlink/rename on the system makes user
 * space re-read the maps of its targets once. */
static __always_inline int names_changed(long ret)
{
    if (ret != 0)
        return 0;
    int zero = 0;
    u64 *gen = names_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return names_changed(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return names_changed(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return names_changed(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return names_changed(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return names_changed(args->ret); }

/* A watched process's own truncate, ftruncate or fallocate (hole punch,
 * collapse, zero range) of a file it maps drops those pages from its page
 * tables with no fault and no address-space call, and its rss_stat updates
 * are its own: counted, for user space to rescan its file mappings. */
static __always_inline struct mt_stats *own_stats(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return stats.lookup(&tgid);         /* NULL: not a watched process */
}

static __always_inline int file_cut(long ret)
{
    struct mt_stats *st = ret == 0 ? own_stats() : NULL;
    if (st)
        __sync_fetch_and_add(&st->file_cuts, 1);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_truncate) { return file_cut(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_ftruncate) { return file_cut(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fallocate) { return file_cut(args->ret); }

/* A fork (clone without CLONE_VM) of a watched process shares its anonymous
 * pages copy-on-write with the child, changing their PSS with no fault or
 * address-space call: counted (at entry, so a failed fork counts too) for
 * user space to recompute PSS. vfork shares the mm itself and is not counted. */
#define MT_CLONE_VM 0x00000100ULL
static __always_inline int count_fork(u64 clone_flags)
{
    struct mt_stats *st = clone_flags & MT_CLONE_VM ? NULL : own_stats();
    if (st)
        __sync_fetch_and_add(&st->forks, 1);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_clone) { return count_fork(args->clone_flags); }
TRACEPOINT_PROBE(syscalls, sys_enter_fork) { return count_fork(0); }
TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u64 flags = MT_CLONE_VM;     /* unreadable arguments: the call fails */
    bpf_probe_read_user(&flags, sizeof(flags), args->uargs);
    return count_fork(flags);
}

#define PR_SET_VMA 0x53564d41
TRACEPOINT_PROBE(syscalls, sys_enter_prctl)
{
    if (args->option != PR_SET_VMA)
        return 0;
    return stash(MT_SYS_OTHER, args->__syscall_nr, MT_IN_NO_RESCAN, args->option, args->arg2,
                 args->arg3, args->arg4, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_prctl) { return to_finish(args); }

#ifndef MT_NO_RSS_STAT
/* RSS changes of a watched mm made outside its own context (exit, ksmd,
 * khugepaged, reclaim by others, process_madvise) carry no address: flag
 * them so user space rescans. */
#ifdef MT_TASK_MM_OFFSET
RAW_TRACEPOINT_PROBE(rss_stat)
{
    u64 mm = ctx->args[0];
    u64 cur_mm = 0;
    char *task = (char *)bpf_get_current_task();
    bpf_probe_read_kernel(&cur_mm, sizeof(cur_mm), task + MT_TASK_MM_OFFSET);
    if (mm != cur_mm)
        remote_change(mm);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, rss_stat)
{
    u64 mm = args->mm_id;
    if (args->curr)
        learn_mm(mm);
    else
        remote_change(mm);
    return 0;
}
#endif
#endif /* MT_NO_RSS_STAT */

#ifdef MT_WATCH_EXECS
/* A notice that did not fit its ring: counted, shown as memtrace_events_lost. */
static __always_inline int notice_lost(int which)
{
    u64 *lost = notices_lost.lookup(&which);
    if (lost)
        __sync_fetch_and_add(lost, 1);
    return 0;
}

/* Agent mode: tell user space about every exec so it can match its rules
 * against the new program (pid only; user space reads the rest from /proc). */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 *rec = execs.ringbuf_reserve(sizeof(u32));
    if (!rec)
        return notice_lost(0);
    *rec = args->pid;
    execs.ringbuf_submit(rec, 0);
    return 0;
}

/* Agent mode: a watched process that forks a new process (not a thread) without
 * exec (postgres backends, nginx workers) is never seen by sched_process_exec:
 * stream the child's pid so user space applies its rules to it. task_newtask
 * runs in the parent at the end of a successful copy_process, with the
 * child's pid and the clone flags as arguments. */
#define MT_CLONE_THREAD 0x00010000ULL
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & MT_CLONE_THREAD)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(parent))
        return 0;
    u32 *rec = forks.ringbuf_reserve(sizeof(u32));
    if (!rec)
        return notice_lost(1);
    *rec = args->pid;
    forks.ringbuf_submit(rec, 0);
    return 0;
}
#endif
