"""Recordings (`.mtrace`): what memtrace saw, kept for reports, diffs and gates
(docs/recording.md). writer.py writes one while watch/run/record/agent run;
reader.py reads one back, up to a kill or a corrupt line."""
