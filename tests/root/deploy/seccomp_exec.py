"""Apply seccomp filters the way systemd does for a unit, then exec a command:

    python seccomp_exec.py UNIT -- COMMAND [ARGS...]     (UNIT "-": read it from stdin)

Filters, read from UNIT's [Service] section: SystemCallFilter= (successive lines: the
first allow-list sets the mode, "~" lines remove, later lines add back; groups are
expanded with `systemd-analyze syscall-filter`), SystemCallErrorNumber= (the action for
calls outside the list), MemoryDenyWriteExecute=yes (systemd's seccomp rules: no mmap
with PROT_WRITE|PROT_EXEC, no mprotect/pkey_mprotect adding PROT_EXEC, no shmat with
SHM_EXEC) and RestrictAddressFamilies= (socket(2) of other families fails with
EAFNOSUPPORT). Needs libseccomp's Python bindings (Debian: python3-seccomp) and
no_new_privs or CAP_SYS_ADMIN (the caller runs it under setpriv --no-new-privs)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import seccomp  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "deploy"))
from helpers import parse_unit, unit_values  # noqa: E402


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]], seen: set[str]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                calls |= expand(groups[name], groups, seen)
        else:
            calls.add(name)
    return calls


def allowed_calls(filters: list[str]) -> set[str]:
    groups = syscall_groups()
    allowed: set[str] = set()
    for i, line in enumerate(filters):
        words = line.split()
        if words[0].startswith("~"):
            assert i > 0, "a deny-list unit is not emulated"
            allowed -= expand([words[0][1:], *words[1:]], groups, set())
        else:
            allowed |= expand(words, groups, set())
    return allowed


def main() -> None:
    unit, sep, *command = sys.argv[1:]
    assert sep == "--" and command
    if unit == "-":
        with tempfile.NamedTemporaryFile("w", suffix=".service") as f:
            f.write(sys.stdin.read())
            f.flush()
            entries = parse_unit(Path(f.name))
    else:
        entries = parse_unit(Path(unit))

    def one(key: str, default: str = "") -> str:
        values = unit_values(entries, "Service", key)
        return values[-1] if values else default

    filters = []
    if one("MemoryDenyWriteExecute") == "yes":
        prot_write, prot_exec, shm_exec = 0x2, 0x4, 0o100000
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap",
                   seccomp.Arg(2, seccomp.MASKED_EQ, prot_write | prot_exec,
                               prot_write | prot_exec))
        for call in ("mprotect", "pkey_mprotect"):
            f.add_rule(seccomp.ERRNO(errno.EPERM), call,
                       seccomp.Arg(2, seccomp.MASKED_EQ, prot_exec, prot_exec))
        f.add_rule(seccomp.ERRNO(errno.EPERM), "shmat",
                   seccomp.Arg(2, seccomp.MASKED_EQ, shm_exec, shm_exec))
        filters.append(f)
    families = one("RestrictAddressFamilies").split()
    if families:
        keep = {int(getattr(socket, name)) for name in families}
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        top = max(keep)
        for family in range(top):
            if family not in keep:
                f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
                           seccomp.Arg(0, seccomp.EQ, family))
        f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
                   seccomp.Arg(0, seccomp.GT, top))
        filters.append(f)
    lines = unit_values(entries, "Service", "SystemCallFilter")
    if lines:
        error = getattr(errno, one("SystemCallErrorNumber", "EPERM"))
        f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(error))
        for call in sorted(allowed_calls(lines)):
            # (names this architecture lacks are skipped)
            with contextlib.suppress(RuntimeError, ValueError):
                f.add_rule(seccomp.ALLOW, call)
        filters.append(f)  # last: it must still allow seccomp(2) for the others
    for f in filters:
        f.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
