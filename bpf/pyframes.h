/* --stacks: the CPython 3.11 frames of the faulting thread, read at a sample
 * of a process user space registered in py_targets (docs/stacks.md, "Python").
 * Only user memory is read (bpf_probe_read_user), at offsets of CPython's own
 * structs that user space passes at compile time (-DMT_PY_*, from
 * memtrace/trace/pyoffsets.py): one layout, CPython 3.11's x86-64 release
 * builds. Without them (MT_PY undefined) nothing here is compiled. The map
 * py_targets is declared in each main file (memtrace.bpf.c, malloc.bpf.c):
 * BCC rewrites map calls in its main file only. */
#ifndef MT_PYFRAMES_H
#define MT_PYFRAMES_H

/* The code object's fields read for its fingerprint, in one read of
 * [MT_PY_CODE_LO, + MT_PY_CODE_SPAN): co_firstlineno and co_qualname */
#define MT_PY_CODE_LO MT_PY_CODE_FIRSTLINENO
#define MT_PY_CODE_SPAN 64
_Static_assert(MT_PY_CODE_QUALNAME - MT_PY_CODE_LO + 8 <= MT_PY_CODE_SPAN, "co_qualname");
_Static_assert(((MT_PY_CODE_QUALNAME - MT_PY_CODE_LO) & 7) == 0, "co_qualname aligned");
/* The qualname string's fields read, in one read of [MT_PY_UNICODE_LENGTH, + 40):
 * its length, its state (bit 6: ASCII) and an ASCII string's first 8 bytes */
#define MT_PY_STR_SPAN 40
_Static_assert(MT_PY_UNICODE_ASCII_SIZE - MT_PY_UNICODE_LENGTH + 8 <= MT_PY_STR_SPAN, "data");
_Static_assert(MT_PY_UNICODE_STATE - MT_PY_UNICODE_LENGTH + 4 <= MT_PY_STR_SPAN, "state");
_Static_assert(((MT_PY_UNICODE_ASCII_SIZE - MT_PY_UNICODE_LENGTH) & 7) == 0, "data aligned");
_Static_assert(((MT_PY_UNICODE_STATE - MT_PY_UNICODE_LENGTH) & 7) == 0, "state aligned");
#define MT_PY_OFFSET_UNKNOWN 0xFFFFFFFFULL

/* What a frame's py_instr holds: the byte offset of prev_instr in its code
 * object (MT_PY_OFFSET_UNKNOWN when outside 32 bits) in the low half, and the
 * code object's fingerprint, read now, in the high half: user space names the
 * code object at that address later, and checks it is still the one sampled
 * (stacks/python.py code_fingerprint: the same formula; 0 when the code
 * object or its name could not be read: then any object there is taken).
 * The fingerprint folds co_firstlineno, the address of co_qualname, and that
 * string's length and (ASCII) first 8 characters: a code object allocated
 * where a freed one was, its name where the freed name was, still differs
 * unless the names begin alike. Only fields that never change in a live
 * object are read (not the string's hash, computed lazily). */
static __always_inline u64 py_instr_word(u64 code, u64 prev_instr)
{
    u64 off = prev_instr - code;
    if (prev_instr < code || off > MT_PY_OFFSET_UNKNOWN)
        off = MT_PY_OFFSET_UNKNOWN;
    u64 fields[MT_PY_CODE_SPAN / 8];
    u32 fp = 0;
    if (bpf_probe_read_user(fields, sizeof(fields), (void *)(code + MT_PY_CODE_LO)) == 0) {
        u32 firstlineno = (u32)fields[0];
        u64 qualname = fields[(MT_PY_CODE_QUALNAME - MT_PY_CODE_LO) / 8];
        u64 str[MT_PY_STR_SPAN / 8] = {};
        /* a name string BPF cannot read (its page swapped out: BPF does not
         * fault pages in) leaves the fingerprint 0, "not checked", rather
         * than one user space, which reads it, would not match */
        if (qualname && bpf_probe_read_user(str, sizeof(str),
                                            (void *)(qualname + MT_PY_UNICODE_LENGTH)) == 0) {
            u64 len = str[0], text = 0;
            if ((str[(MT_PY_UNICODE_STATE - MT_PY_UNICODE_LENGTH) / 8] >> 6) & 1) {
                text = str[(MT_PY_UNICODE_ASCII_SIZE - MT_PY_UNICODE_LENGTH) / 8];
                if (len < 8)
                    text &= (1ULL << (len * 8)) - 1;
            }
            fp = (u32)(qualname >> 4) ^ (firstlineno * 0x9E3779B1U) ^ ((u32)len * 0x85EBCA6BU)
                 ^ (u32)text ^ (u32)(text >> 32);
        }
    }
    return off | ((u64)fp << 32);
}

/* The frame fields read, in one read of [MT_PY_FRAME_LO, + MT_PY_FRAME_SPAN) */
#define MT_PY_FRAME_LO MT_PY_FRAME_CODE
#define MT_PY_FRAME_SPAN 40
_Static_assert(MT_PY_FRAME_PREVIOUS - MT_PY_FRAME_LO + 8 <= MT_PY_FRAME_SPAN, "previous");
_Static_assert(MT_PY_FRAME_INSTR - MT_PY_FRAME_LO + 8 <= MT_PY_FRAME_SPAN, "prev_instr");
_Static_assert(MT_PY_FRAME_ENTRY - MT_PY_FRAME_LO + 1 <= MT_PY_FRAME_SPAN, "is_entry");
_Static_assert(((MT_PY_FRAME_PREVIOUS - MT_PY_FRAME_LO) & 7) == 0, "previous aligned");
_Static_assert(((MT_PY_FRAME_INSTR - MT_PY_FRAME_LO) & 7) == 0, "prev_instr aligned");

static __always_inline u64 py_word(u64 addr)
{
    u64 v = 0;
    if (bpf_probe_read_user(&v, sizeof(v), (void *)addr))
        return 0;
    return v;
}

/* The thread state of thread `tid`: the one holding the GIL if it is tid's
 * (the usual case: the faulting thread runs Python code), else found in the
 * main interpreter's list. 0 when none is (a thread that never ran Python). */
static __always_inline u64 py_thread_state(u64 runtime, u32 tid)
{
    u64 ts = py_word(runtime + MT_PY_RT_TSTATE);
    if (ts && (u32)py_word(ts + MT_PY_TS_TID) == tid)
        return ts;
    u64 interp = py_word(runtime + MT_PY_RT_INTERP_MAIN);
    ts = interp ? py_word(interp + MT_PY_INTERP_THREADS) : 0;
    for (int i = 0; i < MT_PY_THREADS && ts; i++) {
        if ((u32)py_word(ts + MT_PY_TS_TID) == tid)
            return ts;
        ts = py_word(ts + MT_PY_TS_NEXT);
    }
    return 0;
}

/* The current thread's frames, _PyRuntime at `runtime`, into a sample's
 * py_count, py_flags, py_code[MT_PY_FRAMES] and py_instr[MT_PY_FRAMES] (a
 * fault's mt_stack_sample or an allocation's mt_malloc_sample). */
#define PY_WALK(s, runtime) \
    py_walk(&(s)->py_count, &(s)->py_flags, (s)->py_code, (s)->py_instr, runtime)

static __always_inline void py_walk(u32 *count, u32 *flags, u64 *codes, u64 *instrs, u64 runtime)
{
    u64 ts = py_thread_state(runtime, (u32)bpf_get_current_pid_tgid());
    if (!ts) {
        *flags = MT_PY_NO_THREAD;
        return;
    }
    u64 cframe = py_word(ts + MT_PY_TS_CFRAME);
    u64 f = cframe ? py_word(cframe + MT_PY_CFRAME_FRAME) : 0;
    u64 buf[MT_PY_FRAME_SPAN / 8];
    u32 n = 0;
    *flags = MT_PY_READ;
    for (int i = 0; i < MT_PY_FRAMES && f; i++) {
        if (bpf_probe_read_user(buf, sizeof(buf), (void *)(f + MT_PY_FRAME_LO)))
            break;
        u64 code = buf[0];
        u8 entry = ((u8 *)buf)[MT_PY_FRAME_ENTRY - MT_PY_FRAME_LO];
        if (!code)
            break;
        codes[i] = code | (entry ? 1 : 0);
        instrs[i] = py_instr_word(code, buf[(MT_PY_FRAME_INSTR - MT_PY_FRAME_LO) / 8]);
        n = i + 1;
        f = buf[(MT_PY_FRAME_PREVIOUS - MT_PY_FRAME_LO) / 8];
    }
    if (f && n == MT_PY_FRAMES)
        *flags |= MT_PY_TRUNCATED;
    *count = n;
}

#endif
