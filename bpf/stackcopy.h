/* The bounded copy of the user stack at a sample, shared by --stacks
 * (memtrace.bpf.c, at a sampled fault) and --malloc (malloc.bpf.c, at a
 * sampled allocation). Needs MT_STACK_COPY (a power of two), MT_PAGE_SIZE and
 * MT_PAGE_MASK. */
#ifndef MT_STACKCOPY_H
#define MT_STACKCOPY_H

/* Copy [sp, end) of user memory, end - sp in [1, MT_STACK_COPY]: 0 on success. */
static __always_inline long copy_to(u8 *dst, u64 sp, u64 end)
{
    /* masked into [1, MT_STACK_COPY] so that every verifier sees the bound */
    u32 len = (((u32)(end - sp)) - 1) & (MT_STACK_COPY - 1);
    return bpf_probe_read_user(dst, len + 1, (void *)sp);
}

/* Copy [sp, sp + MT_STACK_COPY) of user memory, or, when its end is unmapped
 * (a read fails as a whole, after a fault), the longest prefix ending at a page
 * boundary. The CPU remembers where a copy was cut (*cut_end, *cut_tgid, in a
 * per-CPU map value): the next sample with sp just below that end (the same
 * shallow stack, as a main thread's near the top of [stack]) copies up to it
 * at once instead of failing first. Returns the bytes copied. */
static __always_inline u32 copy_stack(u64 *cut_end, u64 *cut_tgid, u32 tgid, u8 *dst, u64 sp)
{
    u64 end = *cut_end;
    if (*cut_tgid == tgid && end > sp && end - sp < MT_STACK_COPY &&
        copy_to(dst, sp, end) == 0)
        return end - sp;
    if (bpf_probe_read_user(dst, MT_STACK_COPY, (void *)sp) == 0)
        return MT_STACK_COPY;
    u32 head = MT_PAGE_SIZE - (sp & MT_PAGE_MASK);
#pragma unroll
    for (int pages = MT_STACK_COPY / MT_PAGE_SIZE - 1; pages >= 0; pages--) {
        u32 len = head + pages * MT_PAGE_SIZE;
        if (len >= MT_STACK_COPY)
            continue;
        if (copy_to(dst, sp, sp + len) == 0) {
            *cut_end = sp + len;
            *cut_tgid = tgid;
            return len;
        }
    }
    return 0;
}

#endif
