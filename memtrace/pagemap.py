"""Exact resident pages of an address range, from the kernel's page tables.

Uses the PAGEMAP_SCAN ioctl (Linux 6.7+) on /proc/PID/pagemap, asking for pages
that are present and not the shared zero page, which is exactly what smaps Rss
counts. Each returned run says whether its pages are anonymous (PAGE_IS_FILE
clear) or file/shmem backed."""

from __future__ import annotations

import ctypes
import errno
import os

PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_PFNZERO = 1 << 5


class _PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


# _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16
_VEC_LEN = 2048

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

# (start, end, anon): one run of resident pages of one kind
Run = tuple[int, int, bool]


class ScanUnsupported(OSError):
    pass


class PagemapScanner:
    """PAGEMAP_SCAN on one process. Raises ProcessLookupError once it has gone."""

    def __init__(self, pid: int, proc_root: str = "/proc") -> None:
        self.pid = pid
        self.fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = (_PageRegion * _VEC_LEN)()
        self._arg = _PmScanArg()
        self.ioctls = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def scan(self, start: int, end: int) -> list[Run]:
        """Resident runs in [start, end), in address order. Runs are coalesced
        by the kernel across adjacent VMAs: callers clip them to VMA bounds."""
        arg = self._arg
        runs: list[Run] = []
        cursor = start
        while cursor < end:
            arg.size = ctypes.sizeof(_PmScanArg)
            arg.flags = 0
            arg.start = cursor
            arg.end = end
            arg.walk_end = 0
            arg.vec = ctypes.addressof(self._vec)
            arg.vec_len = _VEC_LEN
            arg.max_pages = 0
            arg.category_inverted = PAGE_IS_PFNZERO
            arg.category_mask = PAGE_IS_PRESENT | PAGE_IS_PFNZERO
            arg.category_anyof_mask = 0
            arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_FILE
            n = _libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.byref(arg))
            self.ioctls += 1
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.ESRCH:
                    raise ProcessLookupError(self.pid)
                if err in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise ScanUnsupported(err, "PAGEMAP_SCAN not supported by this kernel")
                raise OSError(err, os.strerror(err))
            vec = self._vec
            for i in range(n):
                r = vec[i]
                runs.append((r.start, r.end, not (r.categories & PAGE_IS_FILE)))
            # Resume only when the vector was full: walk_end can stop short of
            # `end` with everything delivered, and resuming then double counts.
            if n < _VEC_LEN or arg.walk_end <= cursor:
                break
            cursor = arg.walk_end
        return runs


def probe_pagemap_scan() -> tuple[bool, str]:
    """Try PAGEMAP_SCAN on our own address space."""
    try:
        scanner = PagemapScanner(os.getpid())
    except OSError as e:
        return False, f"cannot open /proc/self/pagemap: {e.strerror}"
    try:
        buf = ctypes.create_string_buffer(4096)
        addr = ctypes.addressof(buf)
        runs = scanner.scan(addr & ~4095, (addr & ~4095) + 4096)
        return bool(runs), "ok" if runs else "returned no resident page for a touched page"
    except ScanUnsupported:
        return False, "ioctl not supported (needs Linux 6.7+)"
    except OSError as e:
        return False, f"ioctl failed: {e.strerror}"
    finally:
        scanner.close()
