"""Builds and drops a large dict, then answers 'm' on stdin with mallinfo2()
fields (one line) until stdin closes: the quiescent point for memtrace heap."""

import ctypes
import gc
import os
import sys

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
          "uordblks", "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
d = {i: str(i) * 3 for i in range(int(sys.argv[1]))}
del d
gc.collect()


def mallinfo() -> bytes:
    m = libc.mallinfo2()
    return (" ".join(f"{f}={getattr(m, f)}" for f in FIELDS) + "\n").encode()


mallinfo()  # the first call may allocate
os.write(1, b"READY\n")
while os.read(0, 1) == b"m":
    os.write(1, mallinfo())
