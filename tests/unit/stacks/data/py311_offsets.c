/* offsetof() of what memtrace/trace/pyoffsets.py holds, against the installed
 * CPython headers (tests/unit/stacks/test_pyoffsets.py builds and runs it). */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_frame.h"
#define P(name, expr) printf("%s %zu\n", name, (size_t)(expr))
int main(void) {
    P("version", PY_VERSION_HEX);
    P("runtime_tstate_current", offsetof(_PyRuntimeState, gilstate.tstate_current));
    P("runtime_interp_main", offsetof(_PyRuntimeState, interpreters.main));
    P("interp_threads_head", offsetof(PyInterpreterState, threads.head));
    P("tstate_next", offsetof(PyThreadState, next));
    P("tstate_native_thread_id", offsetof(PyThreadState, native_thread_id));
    P("tstate_cframe", offsetof(PyThreadState, cframe));
    P("cframe_current_frame", offsetof(_PyCFrame, current_frame));
    P("frame_code", offsetof(_PyInterpreterFrame, f_code));
    P("frame_previous", offsetof(_PyInterpreterFrame, previous));
    P("frame_prev_instr", offsetof(_PyInterpreterFrame, prev_instr));
    P("frame_is_entry", offsetof(_PyInterpreterFrame, is_entry));
    P("code_filename", offsetof(PyCodeObject, co_filename));
    P("code_name", offsetof(PyCodeObject, co_name));
    P("code_qualname", offsetof(PyCodeObject, co_qualname));
    P("code_firstlineno", offsetof(PyCodeObject, co_firstlineno));
    P("code_linetable", offsetof(PyCodeObject, co_linetable));
    P("code_adaptive", offsetof(PyCodeObject, co_code_adaptive));
    P("bytes_size", offsetof(PyVarObject, ob_size));
    P("bytes_data", offsetof(PyBytesObject, ob_sval));
    P("unicode_length", offsetof(PyASCIIObject, length));
    P("unicode_state", offsetof(PyASCIIObject, state));
    P("unicode_ascii_size", sizeof(PyASCIIObject));
    P("unicode_compact_size", sizeof(PyCompactUnicodeObject));
    return 0;
}
