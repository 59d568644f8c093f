"""What the stack tests share: the small C program they build (prog.c: main ->
outer -> inner -> memset, -O2 without frame pointers) and the CFI table as
binutils' readelf decodes it (an independent reading to compare with)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-fomit-frame-pointer"]


def build_prog(out_dir: Path, source: Path = HERE / "prog.c", name: str = "prog") -> Path:
    if shutil.which("cc") is None:
        import pytest
        pytest.skip("no C compiler")
    exe = out_dir / name
    subprocess.run(["cc", *CFLAGS, "-o", str(exe), str(source)], check=True)
    return exe


def nm_functions(path: Path, dynamic: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of the sized function symbols nm lists."""
    args = ["nm", "-S", "--defined-only"] + (["-D"] if dynamic else []) + [str(path)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    funcs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in ("T", "t", "W", "i"):
            funcs[parts[3].split("@")[0]] = (int(parts[0], 16), int(parts[1], 16))
    return funcs


@dataclass
class ReadelfRow:
    loc: int
    cfa: str                  # "rsp+8", "rbp+16", "exp", ...
    cols: dict[str, str]      # register name -> "u", "c-16", "exp", ...


@dataclass
class ReadelfFde:
    start: int
    end: int
    rows: list[ReadelfRow]


_FDE = re.compile(r"FDE cie=\w+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def readelf_fdes(path: Path, section: str = "frames-interp") -> list[ReadelfFde]:
    """The FDEs of .eh_frame with their rows, as `readelf --debug-dump=frames-interp`
    prints them (FDEs with no instructions print no rows)."""
    # readelf exits 1 on Debian's libc (it cannot follow .gnu_debuglink) after
    # printing every table: read its output whatever the status
    out = subprocess.run(["readelf", f"--debug-dump={section}", str(path)],
                         capture_output=True, text=True).stdout
    assert "FDE" in out, f"readelf printed no FDE for {path}"
    fdes: list[ReadelfFde] = []
    header: list[str] = []
    current: ReadelfFde | None = None
    for line in out.splitlines():
        m = _FDE.search(line)
        if m:
            current = ReadelfFde(int(m.group(1), 16), int(m.group(2), 16), [])
            fdes.append(current)
            continue
        if "CIE" in line:
            current = None
            continue
        fields = re.sub(r"\b(r\d+) \(\w+\)", r"\1", line).split()   # "r9 (r9)" -> "r9"
        if fields[:2] == ["LOC", "CFA"]:
            header = fields[2:]
        elif current is not None and len(fields) >= 2 and re.fullmatch(r"[0-9a-f]{16}", fields[0]):
            current.rows.append(ReadelfRow(int(fields[0], 16), fields[1],
                                           dict(zip(header, fields[2:]))))
    return fdes
