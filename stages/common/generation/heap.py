"""Hand the C heap's free pages back to the system before the answer's largest allocations.

Stages before decode (building and applying the adapter's deltas, embedding the question) free most of what they
allocate, but glibc keeps freed memory that is not at the top of its heap, and the prompt's prefill then adds its
activations on top of it. `malloc_trim(0)` gives every free page of every arena back (MADV_DONTNEED; a few
milliseconds). Called before and after the prefill: the answer's peak RSS 974 -> 951 MiB (`python -m bench --only
rss`). A no-op where the C library has no `malloc_trim` (not glibc).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Give free heap pages back; True if the C library could (glibc's malloc_trim returns 1 if it released any)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
