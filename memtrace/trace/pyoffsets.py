"""Offsets into CPython 3.11's structs that --stacks needs to read Python
frames (docs/stacks.md, "Python"): the BPF side walks thread states and
interpreter frames with them, user space reads code objects and strings.

One layout: CPython 3.11 release builds (no Py_DEBUG, no Py_TRACE_REFS) on
x86-64, as `offsetof` gives them against the 3.11 headers with
-DPy_BUILD_CORE (tests/unit/stacks/test_pyoffsets.py compiles that program
and compares it with this table where the headers are installed). 3.12
moved these structs (tstate_current, cframe and f_code are gone or renamed):
a 3.12 target gets no Python frames."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PyOffsets:
    """Byte offsets (and sizes) in one CPython build's structs."""

    runtime_tstate_current: int     # _PyRuntimeState.gilstate.tstate_current
    runtime_interp_main: int        # _PyRuntimeState.interpreters.main
    interp_threads_head: int        # PyInterpreterState.threads.head
    tstate_next: int                # PyThreadState.next
    tstate_native_thread_id: int    # PyThreadState.native_thread_id
    tstate_cframe: int              # PyThreadState.cframe
    cframe_current_frame: int       # _PyCFrame.current_frame
    frame_code: int                 # _PyInterpreterFrame.f_code
    frame_previous: int             # _PyInterpreterFrame.previous
    frame_prev_instr: int           # _PyInterpreterFrame.prev_instr
    frame_is_entry: int             # _PyInterpreterFrame.is_entry (a bool)
    code_filename: int              # PyCodeObject.co_filename
    code_name: int                  # PyCodeObject.co_name
    code_qualname: int              # PyCodeObject.co_qualname
    code_firstlineno: int           # PyCodeObject.co_firstlineno (an int)
    code_linetable: int             # PyCodeObject.co_linetable (bytes)
    code_adaptive: int              # PyCodeObject.co_code_adaptive (the code units)
    bytes_size: int                 # PyVarObject.ob_size
    bytes_data: int                 # PyBytesObject.ob_sval
    unicode_length: int             # PyASCIIObject.length
    unicode_state: int              # PyASCIIObject.state (bit field)
    unicode_ascii_size: int         # sizeof(PyASCIIObject): compact ASCII data follows
    unicode_compact_size: int       # sizeof(PyCompactUnicodeObject): other compact data

    def bpf_defines(self) -> list[str]:
        """The -D flags of bpf/pyframes.h."""
        return [
            "-DMT_PY",
            f"-DMT_PY_RT_TSTATE={self.runtime_tstate_current}",
            f"-DMT_PY_RT_INTERP_MAIN={self.runtime_interp_main}",
            f"-DMT_PY_INTERP_THREADS={self.interp_threads_head}",
            f"-DMT_PY_TS_NEXT={self.tstate_next}",
            f"-DMT_PY_TS_TID={self.tstate_native_thread_id}",
            f"-DMT_PY_TS_CFRAME={self.tstate_cframe}",
            f"-DMT_PY_CFRAME_FRAME={self.cframe_current_frame}",
            f"-DMT_PY_FRAME_CODE={self.frame_code}",
            f"-DMT_PY_FRAME_PREVIOUS={self.frame_previous}",
            f"-DMT_PY_FRAME_INSTR={self.frame_prev_instr}",
            f"-DMT_PY_FRAME_ENTRY={self.frame_is_entry}",
            f"-DMT_PY_CODE_FIRSTLINENO={self.code_firstlineno}",
            f"-DMT_PY_CODE_QUALNAME={self.code_qualname}",
            f"-DMT_PY_UNICODE_LENGTH={self.unicode_length}",
            f"-DMT_PY_UNICODE_STATE={self.unicode_state}",
            f"-DMT_PY_UNICODE_ASCII_SIZE={self.unicode_ascii_size}",
        ]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# offsetof() against the 3.11.2 headers of Debian 12's python3.11-dev and
# pyenv's 3.11.7 (x86-64): the same; used for every 3.11 release build
PY311_X86_64 = PyOffsets(
    runtime_tstate_current=576, runtime_interp_main=48, interp_threads_head=16,
    tstate_next=8, tstate_native_thread_id=160, tstate_cframe=56, cframe_current_frame=8,
    frame_code=32, frame_previous=48, frame_prev_instr=56, frame_is_entry=68,
    code_filename=112, code_name=120, code_qualname=128, code_firstlineno=72,
    code_linetable=136, code_adaptive=184, bytes_size=16, bytes_data=32,
    unicode_length=16, unicode_state=32, unicode_ascii_size=48, unicode_compact_size=72,
)

SUPPORTED = {(3, 11): PY311_X86_64}
"""Offsets by (major, minor) for x86-64 release builds."""
