"""BPF C sources for memtrace, shipped as package data."""
