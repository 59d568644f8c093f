"""One way to print sizes, everywhere (tables, verdicts, explain, event lines).

IEC units with one decimal: `0 B`, `512 B`, `980.0 KiB`, `67.5 MiB`, `1.2 GiB`,
`3.0 TiB`. With exact=True (`--bytes`): the whole number of bytes, no unit.
"""

from __future__ import annotations

_UNITS = (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def fmt_bytes(n: float | None, exact: bool = False) -> str:
    """A size in bytes as text (see the module); `-` for None."""
    if n is None:
        return "-"
    if exact:
        return str(int(n))
    sign = "-" if n < 0 else ""
    a = abs(n)
    for i, (unit, shift) in enumerate(_UNITS):
        if a >= 1 << shift:
            value = a / (1 << shift)
            if round(value, 1) >= 1024 and i > 0:    # 1023.96 KiB -> 1.0 MiB
                unit, value = _UNITS[i - 1][0], a / (1 << _UNITS[i - 1][1])
            return f"{sign}{value:.1f} {unit}"
    if round(a) >= 1024:
        return f"{sign}1.0 KiB"
    return f"{sign}{int(a)} B"


def fmt_delta(n: int | None, exact: bool = False) -> str:
    """A change in bytes: `+1.5 MiB`, `-4.0 KiB`, `0 B`; `-` for None."""
    if n is None:
        return "-"
    text = fmt_bytes(n, exact)
    return f"+{text}" if n > 0 else text
