"""Folded stacks: the text format of Brendan Gregg's flamegraph.pl, which
speedscope, Pyroscope's import and inferno read too.

One line per distinct stack, the outermost caller first, frames joined by `;`,
then a space and the bytes of the chosen measure ("held" or "brought"):

    [heap];_start;main;grow_cache;memset 16777216

With by_mapping (the default) the first frame is the mapping the bytes are in
(`[heap]`, `[anon]`, `libc.so.6`, ...), so a flame graph splits by mapping first,
as memtrace's table does. Frame text: memtrace/views/stackframes.py. Stacks that
give the same text are summed into one line; zero-byte stacks are left out;
lines are sorted (flamegraph.pl sorts them anyway, and a diff stays readable).

The format has no escape: a `;` in a name would split the frame, so it is written
`\\x3b` (a backslash there always starts an escape, see trace/procfs.py), and
control characters (a newline would end the line) are escaped like every name.
"""

from __future__ import annotations

from collections import defaultdict

from memtrace.stacks.profile import StackProfile
from memtrace.views.stackframes import paths

SEPARATOR_ESCAPE = "\\x3b"


def frame_text(text: str) -> str:
    """A frame's text as one field of a folded line."""
    return text.replace(";", SEPARATOR_ESCAPE)


def folded_lines(profile: StackProfile, measure: str = "held", by_mapping: bool = True,
                 modules: str = "ambiguous") -> dict[str, int]:
    """Each folded stack and its bytes (stacks with the same text summed)."""
    out: dict[str, int] = defaultdict(int)
    for nodes, _sample, n in paths(profile, measure, by_mapping, modules):
        out[";".join(frame_text(node.text) for node in nodes)] += n
    return dict(out)


def render_folded(profile: StackProfile, measure: str = "held", by_mapping: bool = True,
                  modules: str = "ambiguous") -> str:
    """The folded stacks of a profile, one line each, newline-terminated."""
    lines = folded_lines(profile, measure, by_mapping, modules)
    return "".join(f"{stack} {n}\n" for stack, n in sorted(lines.items()))
