"""memtrace.trace.attribution: kinds, identities, anon/file/shmem split."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrace.trace.attribution import KINDS, Split, classify, mapping_identity, split
from memtrace.trace.model import Resident
from memtrace.trace.procfs import Vma, parse_maps

EXE = b"/usr/bin/my prog"


def v(path: bytes, perms: str = "r--p", inode: int = 0) -> Vma:
    return Vma(0x1000, 0x2000, perms, 0, "00:00", inode, path)


@pytest.mark.parametrize(
    "path,perms,inode,kind",
    [
        (b"", "rw-p", 0, "anon"),
        (b"[anon:jemalloc arena]", "rw-p", 0, "anon"),
        (b"[heap]", "rw-p", 0, "heap"),
        (b"[stack]", "rw-p", 0, "stack"),
        (b"[stack:1234]", "rw-p", 0, "stack"),
        (b"[vdso]", "r-xp", 0, "special"),
        (b"[vvar]", "r--p", 0, "special"),
        (b"[vsyscall]", "--xp", 0, "special"),
        (b"[uprobes]", "r-xp", 0, "special"),
        (b"/memfd:ring buffer (deleted)", "rw-s", 2049, "shmem"),
        (b"/memfd:x", "rw-p", 7, "shmem"),
        (b"/dev/shm/pulse-shm-1", "rw-s", 42, "shmem"),
        (b"/SYSV0000162e (deleted)", "rw-s", 3, "shmem"),
        (b"/dev/zero (deleted)", "rw-s", 1001, "shmem"),
        (b"[anon_shmem:ring]", "rw-s", 0, "shmem"),
        (b"/some/mystery", "rw-s", 0, "shmem"),  # shared and no inode
        (EXE, "r-xp", 9, "executable"),
        (EXE + b" (deleted)", "r-xp", 9, "executable"),
        (b"/usr/lib/x86_64-linux-gnu/libc.so.6", "r-xp", 9, "library"),
        (b"/usr/lib/libstdc++.so.6.0.30", "r--p", 9, "library"),
        (b"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "r--p", 9, "library"),
        (b"/lib/ld-musl-x86_64.so.1", "r--p", 9, "library"),
        (b"/opt/py/_speedups.cpython-311-x86_64-linux-gnu.so", "r--p", 9, "library"),
        (b"/tmp/gone.so.1 (deleted)", "r--p", 9, "library"),
        (b"/plugins/libx.so", "r--p", 9, "library"),
        (b"/data/x.so.bak", "r--p", 9, "file"),
        (b"/data/also.something", "r--p", 9, "file"),
        (b"/data/x.so/inner.db", "r--p", 9, "file"),
        (b"/var/cache/fontconfig/abc.cache-8", "r--p", 9, "file"),
        (b"/tmp/caf\xe9 \xff.dat", "r--p", 9, "file"),
    ],
)
def test_classify(path, perms, inode, kind):
    assert classify(v(path, perms, inode), EXE) == kind
    assert kind in KINDS


def test_classify_without_exe_never_says_executable():
    assert classify(v(EXE, "r-xp", 9), b"") == "file"
    assert classify(v(b"/usr/bin/python3.11", "r-xp", 9), b"") == "file"


def test_classify_executable_deleted_before_attach():
    exe = b"/tmp/mt_sleep (deleted)"  # what readlink returns once the file is unlinked
    assert classify(v(b"/tmp/mt_sleep (deleted)", "r-xp", 9), exe) == "executable"


def test_classify_fixture_file():
    vmas = parse_maps((Path(__file__).parent / "fixtures" / "maps_tricky").read_bytes())
    kinds = [classify(x, EXE) for x in vmas]
    assert kinds == [
        "executable",
        "executable",
        "heap",
        "anon",
        "anon",
        "shmem",
        "file",
        "library",
        "file",
        "special",
        "special",
        "library",
        "stack",
        "special",
    ]


@pytest.mark.parametrize(
    "path,kind,ident",
    [
        (b"", "anon", "[anon]"),
        (b"[anon:jemalloc arena]", "anon", "[anon:jemalloc arena]"),
        (b"[heap]", "heap", "[heap]"),
        (b"[stack]", "stack", "[stack]"),
        (b"[stack:77]", "stack", "[stack]"),
        (b"[vdso]", "special", "[vdso]"),
        (b"/usr/lib/libc.so.6", "library", "/usr/lib/libc.so.6"),
        (b"/memfd:buf (deleted)", "shmem", "/memfd:buf (deleted)"),
        (b"/tmp/\xff", "file", "/tmp/\\xff"),
    ],
)
def test_mapping_identity(path, kind, ident):
    x = v(path)
    assert classify(x, EXE) == kind
    assert mapping_identity(x, kind) == ident


def test_split():
    r = Resident(anon=3 * 4096, other=5 * 4096)
    assert split(r, "shmem") == Split(anon=3 * 4096, file=0, shmem=5 * 4096)
    for kind in KINDS:
        s = split(r, kind)
        assert s.total == r.total
        assert s.anon == r.anon
        if kind != "shmem":
            assert (s.file, s.shmem) == (5 * 4096, 0)
    assert split(Resident(), "anon").total == 0
