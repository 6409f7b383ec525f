"""Freed memory kept for reuse: glibc's thresholds raised for a ``metakit`` process.

glibc serves an allocation above its ``mmap`` threshold (128 kB, raised at run time up to 32 MB) with
its own ``mmap`` and hands it back with ``munmap`` when it is freed; it also trims the top of its heap
when more than 128 kB there is free. A meta-training step allocates and frees activations of up to
tens of MB (second-order MAML on 5-way Omniglot: a ``[5, 2048, 28, 28]`` float32 support activation,
32 MB), so every such tensor is faulted in again, page by page, each time. With both thresholds
raised (``M_MMAP_THRESHOLD`` to 1 GB, ``M_TRIM_THRESHOLD`` to 2 GB) freed blocks stay in the heap and
are reused. Measured with ``benchmarks/page_faults.py`` (fresh processes, alternately without and
with the setting, 8 iterations each): ``maml_5w1s.yaml`` (its max-pool network of then) goes from 128,587 minor page faults per
meta-iteration to 1,859 and takes 1.26x less CPU time, for 3% more peak memory (``benchmarks/RESULTS.md``).

The process keeps what it has freed, so its resident memory stays near its peak instead of falling
between steps. ``METAKIT_MALLOC=system`` leaves glibc's defaults; elsewhere than glibc nothing changes.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set."""
    if os.environ.get("METAKIT_MALLOC", "").strip().lower() == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
