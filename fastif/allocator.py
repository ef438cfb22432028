"""Keep freed memory mapped in the process instead of handing it back to the kernel.

Every HVP, JVP and LiSSA step allocates and frees a few tensors the size of the
influence parameters (1.9M floats for MiniLM's top block: 7.7 MB). glibc serves
blocks that large with a fresh ``mmap`` and unmaps them on ``free``, so each step
faults its pages in again: about 2,000 minor page faults per HVP, a third of a
LiSSA step at B = 1 on the 2-core benchmark machine. With the mmap and trim
thresholds raised, such blocks come from the heap and stay mapped between steps.

The price is that a one-time peak stays mapped too: ``release_freed_memory`` hands the
heap's free memory back after one (reading and tokenising a training set), so that a
worker's resident memory is what it holds, not the most it ever held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where that is not possible."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    return _tuned


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the kernel (glibc's ``malloc_trim``); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))
