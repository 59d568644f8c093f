"""Addresses to function names: a sorted table of one file's function symbols
(`.symtab`, or `.dynsym` when the file is stripped; modules.py chooses), and
C++ names demangled by `c++filt` (binutils), many names per process.

The table keeps one name per address: of aliases (`read`, `__read`,
`__libc_read`), a global one first, then the one with the fewest leading
underscores, then the shortest. A symbol of size 0 (hand-written assembly)
covers up to the next symbol."""

from __future__ import annotations

import shutil
import struct
import subprocess
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

UNKNOWN = "[unknown]"
_SYM = struct.Struct("<IBBHQQ")          # Elf64_Sym
_FUNC_TYPES = (2, 10)                    # STT_FUNC, STT_GNU_IFUNC
_BIND_RANK = {1: 0, 2: 1, 0: 2}          # GLOBAL, WEAK, LOCAL


@dataclass(frozen=True)
class SymbolTable:
    starts: list[int]
    ends: list[int]
    names: list[bytes]

    @classmethod
    def empty(cls) -> SymbolTable:
        return cls([], [], [])

    def __len__(self) -> int:
        return len(self.starts)

    @classmethod
    def from_elf(cls, symtab: bytes, strtab: bytes) -> SymbolTable:
        """The function symbols of an Elf64_Sym array and its string table."""
        best: dict[int, tuple[tuple[int, int, int], int, bytes]] = {}
        n = len(symtab) - len(symtab) % _SYM.size
        for st_name, info, _other, shndx, value, size in _SYM.iter_unpack(symtab[:n]):
            if info & 0xF not in _FUNC_TYPES or shndx == 0 or value == 0:
                continue
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name:end if end >= 0 else len(strtab)]
            at = name.find(b"@", 1)
            if at > 0:
                name = name[:at]        # .symtab's version suffix: read@@GLIBC_2.2.5
            if not name:
                continue
            rank = (_BIND_RANK.get(info >> 4, 3), len(name) - len(name.lstrip(b"_")), len(name))
            old = best.get(value)
            if old is None or rank < old[0]:
                best[value] = (rank, max(size, old[1] if old else 0), name)
            elif size > old[1]:
                best[value] = (old[0], size, old[2])
        starts = sorted(best)
        ends, names = [], []
        for i, start in enumerate(starts):
            _, size, name = best[start]
            nxt = starts[i + 1] if i + 1 < len(starts) else start + 1
            ends.append(start + size if size else nxt)
            names.append(name)
        return cls(starts, ends, names)

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(name, symbol start) of the function covering a file address."""
        i = bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.ends[i]:
            return None
        return self.names[i].decode("utf-8", "backslashreplace"), self.starts[i]


class Demangler:
    """C++ (Itanium ABI) names made readable by one `c++filt` process per batch
    of new names; names are kept once demangled. Without c++filt, or if it
    fails, names stay as they are."""

    def __init__(self, command: str = "c++filt", max_names: int = 200_000) -> None:
        self.command = shutil.which(command)
        self.max_names = max_names
        self._cache: dict[str, str] = {}
        self.runs = 0                     # c++filt processes started

    @staticmethod
    def mangled(name: str) -> bool:
        return name.startswith("_Z")

    def prepare(self, names: Iterable[str]) -> None:
        """Demangle, in one process, every mangled name not seen yet."""
        todo = sorted({n for n in names if self.mangled(n) and n not in self._cache
                       and "\n" not in n})
        if not todo:
            return
        if len(self._cache) + len(todo) > self.max_names:
            self._cache.clear()
        out = self._run(todo)
        for name, readable in zip(todo, out or todo):
            self._cache[name] = readable

    def _run(self, names: list[str]) -> list[str] | None:
        if self.command is None:
            return None
        self.runs += 1
        try:
            r = subprocess.run([self.command], input="\n".join(names) + "\n",
                               capture_output=True, text=True, timeout=30,
                               errors="backslashreplace")
        except (OSError, subprocess.SubprocessError):
            return None
        lines = r.stdout.split("\n")[:len(names)]
        return lines if r.returncode == 0 and len(lines) == len(names) else None

    def __call__(self, name: str) -> str:
        if not self.mangled(name):
            return name
        if name not in self._cache:
            self.prepare([name])
        return self._cache.get(name, name)
