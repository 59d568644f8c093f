"""memtrace: exact per-mapping resident memory of Linux processes, from eBPF events."""

__version__ = "0.1.0"
