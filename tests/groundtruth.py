"""Ground truth for memtrace's accuracy tests: the kernel's own accounting.

Pure Python, no third-party imports.  ``parse_smaps`` turns the bytes of
/proc/PID/smaps into one dict per mapping::

    {"start": int, "end": int, "perms": "rw-p", "offset": int,
     "dev": "fd:01", "inode": int,
     "path": str,            # path_bytes as memtrace shows names (decode_path),
                             # "" if anonymous
     "path_bytes": bytes,    # the path as in smaps (read_smaps: a name with a
                             # newline, shown as \012 there, from map_files)
     "size_bytes": int, "rss_bytes": int, "pss_bytes": int,
     "anonymous_bytes": int, "swap_bytes": int, ...   # every "kB" field,
                             # in bytes, named in snake case + "_bytes"
     "fields": {"Rss": int, "Anonymous": int, ...},   # same, original names
     "vmflags": ["rd", "wr", ...],
     "extra": {"THPeligible": "0", ...}}              # other fields, raw text

``parse_statm`` / ``read_statm`` give /proc/PID/statm in bytes and
``parse_status_rss`` / ``read_status_rss`` the RssAnon/RssFile/RssShmem split
of /proc/PID/status.
"""

from __future__ import annotations

import os
import re

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# "start-end perms offset dev inode [padding path]"
_HEADER_RE = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)(?: +(.*))?$"
)
# "Name:   1234 kB"
_KB_RE = re.compile(rb"^([A-Za-z_][A-Za-z0-9_]*):\s+(\d+) kB$")
_FIELD_RE = re.compile(rb"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*)$")


def decode_path(raw: bytes) -> str:
    """A name (bytes) as memtrace reports it (docs/output.md, "Names"), written
    here independently of memtrace: valid UTF-8 as it is, a backslash as \\\\,
    \\b \\f \\n \\r \\t, other control and format characters (Unicode Cc, Cf,
    Zl, Zp) as \\uXXXX (\\UXXXXXXXX above the BMP), each byte that is not valid
    UTF-8 as \\xNN."""
    import unicodedata

    out = []
    i = 0
    while i < len(raw):
        # the longest valid UTF-8 sequence (1-4 bytes) starting at i
        for n in (1, 2, 3, 4):
            try:
                ch = raw[i:i + n].decode("utf-8")
            except UnicodeDecodeError:
                continue
            break
        else:
            out.append(f"\\x{raw[i]:02x}")
            i += 1
            continue
        i += n
        if ch in "\\\b\f\n\r\t":
            out.append({"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def snake_case(name: str) -> str:
    """'AnonHugePages' -> 'anon_huge_pages', 'Shared_Clean' -> 'shared_clean',
    'MMUPageSize' -> 'mmu_page_size', 'Pss_Anon' -> 'pss_anon'."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return re.sub(r"_+", "_", s).lower()


def _new_mapping(m: re.Match) -> dict:
    raw_path = m.group(7) or b""
    return {
        "start": int(m.group(1), 16),
        "end": int(m.group(2), 16),
        "perms": m.group(3).decode("ascii"),
        "offset": int(m.group(4), 16),
        "dev": m.group(5).decode("ascii"),
        "inode": int(m.group(6)),
        "path_bytes": raw_path,
        "path": decode_path(raw_path),
        "fields": {},
        "vmflags": [],
        "extra": {},
    }


def parse_smaps(data: bytes) -> list[dict]:
    """Parse the full text (bytes) of /proc/PID/smaps.

    Only b"\\n" separates lines (a path cannot contain a newline: the kernel
    shows one as "\\012").  A header is recognised by its shape; the path is
    everything after the inode and the padding spaces, so it may contain
    spaces, " (deleted)" or bytes that are not UTF-8.
    """
    if isinstance(data, str):  # convenience for tests
        data = data.encode("utf-8", errors="surrogateescape")
    mappings: list[dict] = []
    cur: dict | None = None
    for line in data.split(b"\n"):
        if not line:
            continue
        if cur is not None:
            km = _KB_RE.match(line)
            if km:
                name = km.group(1).decode("ascii")
                value = int(km.group(2)) * 1024
                cur["fields"][name] = value
                cur[snake_case(name) + "_bytes"] = value
                continue
            fm = _FIELD_RE.match(line)
            if fm and not _HEADER_RE.match(line):
                name = fm.group(1).decode("ascii")
                value = fm.group(2).decode("ascii", errors="backslashreplace")
                if name == "VmFlags":
                    cur["vmflags"] = value.split()
                else:
                    cur["extra"][name] = value.strip()
                continue
        hm = _HEADER_RE.match(line)
        if not hm:
            raise ValueError(f"unparsable smaps line: {line!r}")
        cur = _new_mapping(hm)
        mappings.append(cur)
    for mp in mappings:
        # Make the most used keys always present.
        for key in ("size_bytes", "rss_bytes", "pss_bytes", "anonymous_bytes", "swap_bytes"):
            mp.setdefault(key, 0)
    return mappings


def read_smaps(pid: int) -> list[dict]:
    """smaps of a live process. smaps writes a newline in a path as \\012, and a
    path may hold that text too: such names are read from map_files (real
    bytes, root only), as memtrace does."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        mappings = parse_smaps(f.read())
    for m in mappings:
        if b"\\012" in m["path_bytes"]:
            try:
                real = os.readlink(f"/proc/{pid}/map_files/{m['start']:x}-{m['end']:x}".encode())
            except OSError:
                continue
            if real.replace(b"\n", b"\\012") == m["path_bytes"]:
                m["path_bytes"], m["path"] = real, decode_path(real)
    return mappings


def parse_statm(text: str | bytes, page_size: int = PAGE_SIZE) -> dict:
    """/proc/PID/statm: size resident shared text lib data dt (pages)."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    vals = [int(x) for x in text.split()]
    names = ("size", "resident", "shared", "text", "lib", "data", "dt")
    out = {f"{n}_pages": v for n, v in zip(names, vals)}
    out.update({f"{n}_bytes": v * page_size for n, v in zip(names, vals)})
    return out


def read_statm(pid: int) -> dict:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return parse_statm(f.read())


def statm_resident_bytes(pid: int) -> int:
    return read_statm(pid)["resident_bytes"]


def parse_status_rss(text: str | bytes) -> dict:
    """VmRSS/RssAnon/RssFile/RssShmem/VmSize/VmSwap of /proc/PID/status, in
    bytes, keyed vm_rss_bytes, rss_anon_bytes, rss_file_bytes,
    rss_shmem_bytes, vm_size_bytes, vm_swap_bytes."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSize", "VmSwap"):
            num, _, unit = rest.strip().partition(" ")
            assert unit == "kB", line
            out[snake_case(name) + "_bytes"] = int(num) * 1024
    return out


def read_status_rss(pid: int) -> dict:
    with open(f"/proc/{pid}/status", "rb") as f:
        return parse_status_rss(f.read())


def task_states(pid: int) -> dict[int, str]:
    """State letter of every thread of PID (from /proc/PID/task/*/stat)."""
    states = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # comm may contain spaces and parentheses: the state follows the
        # last ')'.
        rest = data[data.rindex(b")") + 2 :]
        states[int(tid)] = rest[:1].decode("ascii")
    return states


def fmt_mapping(m: dict) -> str:
    return f"{m['start']:x}-{m['end']:x} {m.get('perms', '?')} {m.get('path', '')!s}"


# ---------------------------------------------------------------------------
# comparison of a memtrace snapshot with the kernel's accounting


def _b(n) -> str:
    if not isinstance(n, int):
        return repr(n)
    return f"{n} B ({n / 1024:.0f} KiB)"


def _delta(got, want) -> str:
    if isinstance(got, int) and isinstance(want, int):
        return f" (memtrace {got - want:+d} B)"
    return ""


def _range(m: dict) -> str:
    try:
        return f"{m['start']:x}-{m['end']:x}"
    except (KeyError, TypeError, ValueError):
        return f"{m.get('start')!r}-{m.get('end')!r}"


def compare_snapshot(
    snapshot: dict,
    smaps: list[dict],
    statm: dict | None = None,
    status: dict | None = None,
    max_lines: int = 80,
) -> list[str]:
    """Compare one memtrace snapshot object with ground truth read while the
    process was stopped.  Returns human-readable differences ([] = equal).

    Required to be exactly equal:
      * every smaps mapping is in the snapshot with the same (start, end),
        and its rss_bytes == smaps Rss and anon_bytes == smaps Anonymous;
        its perms, offset and path equal the smaps header's;
      * the snapshot has no mapping that smaps does not have;
      * process rss_bytes == statm resident (if statm is given);
      * process anon/file/shmem_bytes == RssAnon/RssFile/RssShmem of
        /proc/PID/status (if status is given).
    """
    diffs: list[str] = []

    if statm is not None:
        want = statm["resident_bytes"]
        got = snapshot.get("rss_bytes")
        if got != want:
            extra = ""
            if "statm_rss_bytes" in snapshot:
                own = _b(snapshot["statm_rss_bytes"])
                extra = f"; memtrace's own statm_rss_bytes at that tick: {own}"
            diffs.append(
                f"process rss_bytes: statm resident {_b(want)} vs memtrace {_b(got)}"
                f"{_delta(got, want)}{extra}"
            )
    if status is not None:
        for ours, theirs in (
            ("anon_bytes", "rss_anon_bytes"),
            ("file_bytes", "rss_file_bytes"),
            ("shmem_bytes", "rss_shmem_bytes"),
        ):
            if theirs not in status:
                continue
            want, got = status[theirs], snapshot.get(ours)
            if got != want:
                diffs.append(
                    f"process {ours}: /proc/PID/status {theirs} {_b(want)} vs "
                    f"memtrace {_b(got)}{_delta(got, want)}"
                )

    snap_maps = snapshot.get("mappings")
    if not isinstance(snap_maps, list):
        diffs.append(f"snapshot has no 'mappings' list (keys: {sorted(snapshot)})")
        return diffs

    by_range: dict[tuple, dict] = {}
    for m in snap_maps:
        key = (m.get("start"), m.get("end"))
        if key in by_range:
            diffs.append(f"memtrace reports {_range(m)} twice")
        by_range[key] = m

    truth_keys = set()
    mapping_diffs: list[str] = []
    for t in sorted(smaps, key=lambda m: m["start"]):
        key = (t["start"], t["end"])
        truth_keys.add(key)
        label = f"{_range(t)} {t['perms']} {t['path']!r}"
        m = by_range.get(key)
        if m is None:
            overlap = [
                o
                for o in snap_maps
                if isinstance(o.get("start"), int)
                and isinstance(o.get("end"), int)
                and o["start"] < t["end"]
                and o["end"] > t["start"]
            ]
            hint = ""
            if overlap:
                hint = "; memtrace has overlapping " + ", ".join(
                    f"{_range(o)} rss={o.get('rss_bytes')}" for o in overlap[:3]
                )
                if len(overlap) > 3:
                    hint += f", ... ({len(overlap)} in all)"
            mapping_diffs.append(
                f"missing from memtrace: {label} (smaps Rss {_b(t['rss_bytes'])}, "
                f"Anonymous {_b(t['anonymous_bytes'])}){hint}"
            )
            continue
        parts = []
        if m.get("rss_bytes") != t["rss_bytes"]:
            parts.append(
                f"rss smaps {_b(t['rss_bytes'])} vs memtrace {_b(m.get('rss_bytes'))}"
                f"{_delta(m.get('rss_bytes'), t['rss_bytes'])}"
            )
        if m.get("anon_bytes") != t["anonymous_bytes"]:
            parts.append(
                f"anon smaps {_b(t['anonymous_bytes'])} vs memtrace {_b(m.get('anon_bytes'))}"
                f"{_delta(m.get('anon_bytes'), t['anonymous_bytes'])}"
            )
        if m.get("perms") != t["perms"]:
            parts.append(f"perms smaps {t['perms']!r} vs memtrace {m.get('perms')!r}")
        if m.get("offset") != t["offset"]:
            parts.append(f"offset smaps {t['offset']:#x} vs memtrace {m.get('offset')!r}")
        if m.get("path") != t["path"]:
            parts.append(f"path smaps {t['path']!r} vs memtrace {m.get('path')!r}")
        if parts:
            mapping_diffs.append(f"{label}: " + "; ".join(parts))

    for m in sorted(snap_maps, key=lambda m: m.get("start") or 0):
        if (m.get("start"), m.get("end")) not in truth_keys:
            mapping_diffs.append(
                f"not in smaps (stale or wrong bounds): {_range(m)} {m.get('perms')} "
                f"{m.get('path')!r} memtrace rss {_b(m.get('rss_bytes'))}"
            )

    if len(mapping_diffs) > max_lines:
        n = len(mapping_diffs) - max_lines
        mapping_diffs = mapping_diffs[:max_lines] + [f"... and {n} more mapping differences"]
    diffs.extend(mapping_diffs)

    if diffs and statm is not None:
        total = sum(t["rss_bytes"] for t in smaps)
        if total != statm["resident_bytes"]:
            diffs.append(
                f"(note: kernel itself: sum of smaps Rss {_b(total)} != statm resident "
                f"{_b(statm['resident_bytes'])})"
            )
    return diffs
