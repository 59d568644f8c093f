"""glibc malloc anatomy read from outside the process, and the background walker."""
