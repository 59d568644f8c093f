"""memtrace's own memory: give back what compiling the BPF program left behind.

BCC compiles in-process with clang and LLVM. Once the programs are loaded the
compiler is not used again, yet it leaves ~25 MB of freed malloc memory in the
heap and ~75 MB of libLLVM/libclang text and read-only data resident (measured
on Debian 12, BCC 0.26, LLVM 14: 162 MB RSS after load, 64 MB after this).
Both are released here, after the programs are loaded (session.py); the
compiler libraries' pages are also dropped once right after `import bcc`
(probes.import_bcc), before compiling: their initialisers leave ~45 MB of code
resident that the compile does not touch again, and the compile's peak, which
is memtrace's VmHWM, is ~30 MB lower for it (130 against 160 MiB measured).

- malloc_trim(0) returns free heap pages to the kernel;
- MADV_DONTNEED drops the page-table entries of the compiler libraries'
  mappings that hold only page-cache pages (not writable, no anonymous pages),
  so they leave our RSS; they stay in the page cache and fault back in if the
  code ever runs again. Mappings with anonymous pages (relocated data, RELRO)
  are never touched: dropping those would discard their contents.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

MADV_DONTNEED = 4
COMPILER_LIBS = re.compile(rb"/lib(LLVM|clang)[^/]*\.so")
_RANGE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S+)")


def clean_compiler_mappings(smaps: bytes) -> list[tuple[int, int]]:
    """(start, end) of the compiler libraries' mappings that are not writable and
    hold no anonymous pages, from /proc/self/smaps text."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps.splitlines():
        m = _RANGE.match(line)
        if m:
            fields = line.split()
            current = None
            if (len(fields) > 5 and b"w" not in m.group(3)
                    and COMPILER_LIBS.search(fields[5])):
                current = (int(m.group(1), 16), int(m.group(2), 16))
        elif current is not None and line.startswith(b"Anonymous:"):
            if line.split()[1] == b"0":
                found.append(current)
            current = None
    return found


def shed_compiler_memory(proc_self: str = "/proc/self") -> int:
    """Release the compiler's leftovers (see the module docstring). Returns the
    resident bytes given back (from statm before and after); 0 when nothing
    could be done. Never raises."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        before = int(Path(proc_self, "statm").read_text().split()[1])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim(0)   # glibc; elsewhere AttributeError: nothing done
        for start, end in clean_compiler_mappings(Path(proc_self, "smaps").read_bytes()):
            libc.madvise(start, end - start, MADV_DONTNEED)
        after = int(Path(proc_self, "statm").read_text().split()[1])
        return max(0, before - after) * page
    except (OSError, AttributeError, ValueError, IndexError):
        return 0
