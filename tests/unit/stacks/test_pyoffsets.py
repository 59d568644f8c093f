"""The CPython 3.11 offsets memtrace uses (memtrace/trace/pyoffsets.py)
against offsetof() over the installed headers, and the BPF flags they give."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memtrace.trace.pyoffsets import PY311_X86_64, SUPPORTED

HERE = Path(__file__).parent
HEADERS = Path("/usr/include/python3.11")
PYFRAMES = Path(__file__).parents[3] / "bpf" / "pyframes.h"


def parse_offsets(text: str) -> dict[str, int]:
    """`name value` lines, as the offsets program prints them."""
    out = {}
    for line in text.splitlines():
        name, value = line.split()
        out[name] = int(value)
    return out


def test_parse_offsets():
    assert parse_offsets("version 51053296\nframe_code 32\n") == {
        "version": 0x030B02F0, "frame_code": 32}
    with pytest.raises(ValueError):
        parse_offsets("frame_code\n")


def header_dirs() -> list[Path]:
    """Every CPython 3.11 header directory found here: the system's
    (python3.11-dev) and pyenv's builds."""
    found = [HEADERS, Path("/usr/local/include/python3.11"),
             *sorted(Path("/root/.pyenv/versions").glob("3.11*/include/python3.11"))]
    return [d for d in found if (d / "internal" / "pycore_frame.h").is_file()]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("headers", header_dirs() or [HEADERS], ids=str)
def test_table_matches_offsetof_over_the_headers(tmp_path, headers):
    if not (headers / "internal" / "pycore_frame.h").is_file():
        pytest.skip(f"no CPython 3.11 headers ({headers}: python3.11-dev)")
    exe = tmp_path / "offsets"
    subprocess.run(["cc", f"-I{headers}", str(HERE / "data" / "py311_offsets.c"), "-o", str(exe)],
                   check=True, capture_output=True)
    got = parse_offsets(subprocess.run([str(exe)], check=True, capture_output=True,
                                       text=True).stdout)
    assert got.pop("version") >> 16 == 0x030B
    assert got == PY311_X86_64.as_dict()


def test_bpf_flags_define_every_offset_pyframes_uses():
    used = set(re.findall(r"\bMT_PY_[A-Z_]+\b", PYFRAMES.read_text()))
    defined = {f[2:].split("=")[0] for f in PY311_X86_64.bpf_defines()}
    own = set(re.findall(r"#define (MT_PY_[A-Z_]+)", PYFRAMES.read_text()))
    header = set(re.findall(r"#define (MT_PY_[A-Z_]+)",
                            (PYFRAMES.parent / "memtrace.h").read_text()))
    assert used - own - header <= defined
    assert {"MT_PY_FRAME_CODE", "MT_PY_RT_TSTATE"} <= defined


def test_only_311_is_supported():
    assert set(SUPPORTED) == {(3, 11)}
