"""One way to write many small byte pieces: joined into batches of about a
given size (one write or compress call per batch, not per piece, and never
one copy of everything)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def joined(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The pieces in order, joined into batches of at least `size` bytes (the
    last may be smaller). A batch of one piece is that piece, not a copy."""
    group: list[bytes] = []
    n = 0
    for piece in pieces:
        group.append(piece)
        n += len(piece)
        if n >= size:
            yield group[0] if len(group) == 1 else b"".join(group)
            group, n = [], 0
    if group:
        yield group[0] if len(group) == 1 else b"".join(group)
