"""memtrace.trace.ownmem: which compiler mappings may be dropped after the BPF load."""

from __future__ import annotations

from memtrace.trace.ownmem import clean_compiler_mappings, shed_compiler_memory

SMAPS = b"""\
7f0000000000-7f0000100000 r--p 00000000 fe:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00100000 fe:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00200000 fe:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 400 kB
Anonymous:           400 kB
7f0000300000-7f0000310000 rw-p 00300000 fe:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  64 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00000000 fe:01 2 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Rss:                 512 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 fe:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 512 kB
Anonymous:             0 kB
7f0000800000-7f0000900000 r--p 00000000 fe:01 4 /home/u/libLLVMfoo/data.bin
Rss:                 512 kB
Anonymous:             0 kB
"""


def test_only_clean_read_only_compiler_mappings():
    assert clean_compiler_mappings(SMAPS) == [
        (0x7F0000000000, 0x7F0000100000),
        (0x7F0000100000, 0x7F0000200000),
        (0x7F0000400000, 0x7F0000500000),
    ]


def test_shed_never_raises(tmp_path):
    assert shed_compiler_memory(str(tmp_path / "missing")) == 0
