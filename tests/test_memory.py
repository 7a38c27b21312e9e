"""keep_freed_memory: freed activations stay in the process (glibc), so the next run reuses them."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
if sys.argv[1] == "tuned":
    from deploykit.memory import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # once, then cached

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

before = rss()
a = np.ones(24 * 2 ** 20 // 8)  # 24 MiB: above glibc's default mmap threshold, below the tuned one
del a
print((rss() - before) / 2 ** 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_memory_stays_in_the_process_only_when_tuned():
    def kept(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert kept("default") < 4  # returned to the kernel (munmap) on free: the next run faults it in again
    assert kept("tuned") > 20  # kept in the heap for the next allocation
