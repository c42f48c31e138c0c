"""Keep freed memory inside the engine's process (Linux, glibc).

glibc hands blocks over 32 MB back to the kernel on free (they are mmap-ed) and trims
the top of its heap, so every batch's large tensors (at vit_b 512 px, batch 4: the
32 MB qkv projections) are page-faulted and zeroed by the kernel again: 15 % of CPU
inference time at batch 4 (benchmarks/RESULTS.md). Serving every block from
the heap and never trimming it keeps those pages for the next batch; this is what
Intel's PyTorch CPU guide gets by preloading jemalloc or tcmalloc, done with glibc's
own ``mallopt`` and no extra library.

Only the engine's own processes call it (the `hfsam` command line and the benchmark's
workers), never Slicer's: the memory a run has used stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import sys

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; returns whether it applied (False off glibc/Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
