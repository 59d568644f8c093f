"""Small pieces every part of memtrace shares: the byte formatter (units), the
ELF program-header reader (elf), the range merger (ranges) and the stderr
logger (log). They import nothing else from memtrace."""
