"""Exit codes, each with its one-line description (the --help epilog and the
table of docs/exit-codes.md say the same), and the one exception type that
carries them to the CLI."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented process exit codes (see docs/exit-codes.md)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    NOT_ROOT = 3
    NO_BCC = 4
    NO_HEADERS = 5
    NO_SUCH_PROCESS = 6
    KERNEL_THREAD = 7
    ZOMBIE = 8
    OWN_PROCESS = 9
    CANNOT_EXECUTE = 10
    BPF_LOAD_FAILED = 11
    NO_TRACEFS = 12
    HEAP_UNREADABLE = 13
    OUTPUT_FAILED = 14
    NO_COMPILER = 15
    RECORDING_UNREADABLE = 16
    BUDGET_EXCEEDED = 17
    MALLOC_INJECT = 18

    @property
    def description(self) -> str:
        """One line, as `--help` and the table of docs/exit-codes.md give it."""
        return DESCRIPTIONS[self]


DESCRIPTIONS = {
    ExitCode.OK: "ok",
    ExitCode.INTERNAL: "internal error (a bug)",
    ExitCode.USAGE: "usage",
    ExitCode.NOT_ROOT: "not root",
    ExitCode.NO_BCC: "BCC missing",
    ExitCode.NO_HEADERS: "kernel headers missing",
    ExitCode.NO_SUCH_PROCESS: "no such process",
    ExitCode.KERNEL_THREAD: "kernel thread",
    ExitCode.ZOMBIE: "zombie",
    ExitCode.OWN_PROCESS: "memtrace's own PID",
    ExitCode.CANNOT_EXECUTE: "command cannot be executed",
    ExitCode.BPF_LOAD_FAILED: "BPF load failed",
    ExitCode.NO_TRACEFS: "tracefs not mounted",
    ExitCode.HEAP_UNREADABLE: "heap: no consistent walk or unverified glibc layout",
    ExitCode.OUTPUT_FAILED: "output cannot be written (disk full, I/O error; a closed pipe "
                            "quietly)",
    ExitCode.NO_COMPILER: "no C compiler to build the --malloc sampler",
    ExitCode.RECORDING_UNREADABLE: "recording unreadable, cut short or corrupt",
    ExitCode.BUDGET_EXCEEDED: "memory budget exceeded",
    ExitCode.MALLOC_INJECT: "watch --malloc: the sampler could not be loaded",
}


class MemtraceError(Exception):
    """An error reported to the user as one line, with a distinct exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class OutputError(MemtraceError):
    """The output (stdout or -o FILE) cannot be written: disk full, I/O error,
    or its reader closed the pipe (`quiet`: said with no message, as `| head`
    expects)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message, ExitCode.OUTPUT_FAILED)
        self.quiet = quiet
