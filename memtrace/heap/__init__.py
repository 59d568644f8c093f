"""Heap anatomy of glibc malloc, read from outside the process.

`memtrace heap PID` answers "why is this memory not given back?": for the main
arena's brk heap and each thread arena it walks every chunk header, reads the
tcache and fastbin lists (chunks cached there look allocated to the arena but
are free to the program), splits free bytes into resident and not with
PAGEMAP_SCAN, and computes what `malloc_trim(0)` would return.

Nothing here depends on debug symbols: Debian's libc.so.6 exports neither
`main_arena` nor `mp_`. The structures are located at run time in libc's
writable data (main_arena is the malloc_state whose `next` chain comes back to
itself; mp_ is the malloc_par whose `sbrk_base` is the start of [heap]), and
every layout assumption is checked against the heap it describes (bin headers,
the walk landing exactly on `top`, `system_mem` equal to the walked size, the
heap_info of thread heaps pointing back at their arena). A failed check gives
"unsupported glibc layout", never numbers.

The analysis is pure: it reads memory through an `AddressSpace` (maps, reads,
resident runs), so unit tests run it on synthetic heap images.

The modules, bottom-up:
  layout      chunk constants, structure offsets per glibc version, HeapError
  memory      the AddressSpace protocol, ResidentMap
  detect      which malloc the process uses
  walk        the chunk walk of one heap segment
  structures  malloc_state (arenas) and malloc_par (mp_), located and checked
  cached      tcache and fastbin lists
  figures     per-arena figures, totals, the verdict
  analysis    every arena of one AddressSpace, and the own-mmap chunks
  process     a live process (process_vm_readv, SIGSTOP snapshot): analyse_process
  worker      the background walker process (`python -m memtrace.heap`)
  sampler     HeapSampler, which feeds watch/run/agent from that walker
The `memtrace heap` command itself (table, JSON) is memtrace/commands/heap.py.
"""
