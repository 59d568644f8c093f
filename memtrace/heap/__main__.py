"""`python -m memtrace.heap`: the background heap walker process started by
HeapSampler (memtrace/heap/sampler.py)."""

from memtrace.heap.worker import worker_main

worker_main()
