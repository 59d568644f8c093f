"""The interface between the watch loop (memtrace/session.py) and a view: what
the loop reports, tick after tick. Kept apart from the loop so that views
import it without the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memtrace.trace.events import SyscallEvent

if TYPE_CHECKING:
    from memtrace.stacks.profile import StackProfile


class Reporter:
    """What the loop reports to: a view (table, JSON Lines, or nothing but
    metrics). Every method does nothing here; a view overrides what it shows."""

    wants_events = False        # the probes stream syscall records for events()
    wants_json_text = False     # snapshots carry their mappings' JSON text
    wants_stack_profiles = False  # --stacks: stack_profile() before each snapshot

    def snapshot(self, snap: dict[str, Any]) -> None:
        """The latest snapshot of one process (docs/output.md)."""

    def stack_profile(self, profile: StackProfile) -> None:
        """--stacks: the whole profile of a process, just before its snapshot
        (only when wants_stack_profiles; the same object while nothing changed)."""

    def events(self, events: list[SyscallEvent]) -> None:
        """The syscall records drained this tick (only when wants_events)."""

    def tick_done(self) -> None:
        """Every process of this tick was reported."""

    def message(self, text: str) -> None:
        """A line for the user (attach, exits, lost notices)."""

    def detached(self, pid: int, why: str) -> None:
        """`pid` is no longer watched (`why`: "exited", ...)."""
        self.message(f"pid {pid} {why}")

    def summary(self, summary: dict[str, Any]) -> None:
        """run's closing summary, the last record."""

    def close(self) -> None:
        """The loop is done."""
