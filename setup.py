"""Package discovery for memtrace-ebpf; all other metadata is in pyproject.toml.

``[tool.setuptools.packages.find]`` alone cannot list ``memtrace.bpf``: its sources
live in the top-level ``bpf/`` directory (mapped by ``[tool.setuptools.package-dir]``),
which a find rooted at the repository names ``bpf``, not ``memtrace.bpf``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["memtrace", "memtrace.*"])
setup(packages=list(dict.fromkeys([*packages, "memtrace.bpf"])))
