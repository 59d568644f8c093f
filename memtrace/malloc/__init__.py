"""--malloc: allocations still outstanding by call stack (docs/malloc.md)."""
