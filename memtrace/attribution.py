"""What each mapping is (its kind and stable identity) and how its resident
bytes split into anon / file / shmem."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memtrace.model import Resident
from memtrace.procfs import Vma

KINDS = ("library", "executable", "heap", "stack", "anon", "file", "shmem", "special")
_LIBRARY = re.compile(rb"(\.so(\.[0-9][^/]*)?|/ld-linux[^/]*)( \(deleted\))?$")
_SHMEM_PREFIXES = (b"/memfd:", b"/dev/shm/", b"/SYSV", b"/dev/zero", b"[anon_shmem:")
_DELETED = b" (deleted)"


def _strip_deleted(path: bytes) -> bytes:
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path


def classify(vma: Vma, exe: bytes) -> str:
    path = vma.path
    if not path or path.startswith(b"[anon:"):
        return "anon"
    if path == b"[heap]":
        return "heap"
    if path.startswith(b"[stack"):
        return "stack"
    if path.startswith(_SHMEM_PREFIXES) or (vma.perms[3:4] == "s" and vma.inode == 0):
        return "shmem"
    if path.startswith(b"["):
        return "special"
    if exe and _strip_deleted(path) == _strip_deleted(exe):
        return "executable"
    if _LIBRARY.search(path):
        return "library"
    return "file"


def mapping_identity(vma: Vma, kind: str) -> str:
    """The name all segments of one object share: a library's path, [heap], [anon]..."""
    if kind == "anon":
        return vma.display_path if vma.path.startswith(b"[anon:") else "[anon]"
    if kind in ("heap", "stack", "special"):
        return "[stack]" if kind == "stack" else vma.display_path
    return vma.display_path


@dataclass(frozen=True)
class Split:
    anon: int
    file: int
    shmem: int

    @property
    def total(self) -> int:
        return self.anon + self.file + self.shmem


def split(resident: Resident, kind: str) -> Split:
    """Non-anonymous pages of a shmem mapping are shmem; of any other, file."""
    if kind == "shmem":
        return Split(anon=resident.anon, file=0, shmem=resident.other)
    return Split(anon=resident.anon, file=resident.other, shmem=0)
