"""Free heap pages handed back before the prefill (`stages/common/generation/heap.py`)."""
from __future__ import annotations

import platform

import numpy as np
import pytest

from stages.common.generation.heap import release_free_heap


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_below_a_live_block_goes_back_to_the_system():
    blocks = [np.ones(100 * 1024 // 8) for _ in range(600)]  # 100 KiB each: heap, below glibc's mmap threshold
    keep = blocks.pop()  # the newest stays alive: what is freed below it is not at the heap's top, so free() keeps it
    before = _rss_mb()
    del blocks
    kept = _rss_mb()
    assert release_free_heap() is True
    assert kept - before > -10 and before - _rss_mb() > 30  # free() gave nothing back; the trim gave ~60 MiB
    assert keep.sum() == keep.size
