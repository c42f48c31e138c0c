"""keep_freed_memory: large blocks come from the heap and stay there after free (Linux, glibc)."""

import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB block, then allocate it again, and look at the
# process's mappings while it is held. glibc's default serves such a block with an mmap
# of its own (unmapped again on free, so its pages are faulted in anew each time); after
# keep_freed_memory() it comes from the [heap] mapping, which keeps its pages.
PROBE = r"""
import ctypes, sys
from HFSAMCore.runtime.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20

def big_mappings():
    anonymous = heap = 0
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi - lo >= size:
            anonymous += len(fields) < 6
            heap += fields[-1] == "[heap]"
    return anonymous, heap

anonymous_before, _ = big_mappings()
p = libc.malloc(size)
ctypes.memset(p, 1, size)
libc.free(p)
p = libc.malloc(size)
anonymous, heap = big_mappings()
print(applied, anonymous - anonymous_before, heap)
"""


def probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, new_anonymous, big_heap = out.stdout.split()
    return applied, int(new_anonymous), int(big_heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    assert probe("default") == ("None", 1, 0)  # a mapping of its own
    assert probe("keep") == ("True", 0, 1)  # from the heap, which has grown to hold it
