"""The module cache after the process exited (memtrace/stacks/modules.py): its
/proc files are gone, so a module is read from its path, but only when that
path is the very file the process mapped (same device and inode)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from memtrace.stacks.modules import ModuleCache
from memtrace.trace.procfs import Vma

PYTHON = Path(os.path.realpath(sys.executable))


def _vma_of(path: Path, inode_delta: int = 0) -> Vma:
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    return Vma(0x400000, 0x500000, "r-xp", 0, dev, st.st_ino + inode_delta,
               os.fsencode(path))


def test_a_gone_process_module_is_read_from_its_path_when_it_is_the_same_file(tmp_path):
    cache = ModuleCache(str(tmp_path))          # an empty /proc: every process is gone
    module = cache.get(4242, _vma_of(PYTHON))
    assert module is not None


def test_another_file_at_that_path_is_not_taken(tmp_path):
    cache = ModuleCache(str(tmp_path))
    with pytest.raises(OSError):
        cache._open(4242, _vma_of(PYTHON, inode_delta=1))
