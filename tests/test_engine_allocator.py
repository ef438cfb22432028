"""The allocator setting that keeps parameter-sized blocks mapped between LiSSA steps (fastif/allocator.py)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from fastif.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_parameter_sized_blocks_are_not_faulted_in_again():
    assert keep_freed_memory()
    assert keep_freed_memory()  # once per process; a second call changes nothing
    floats = 2_000_000  # 8 MB: about the size of MiniLM's influence parameters
    torch.empty(floats).fill_(1.0)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        block = torch.empty(floats)
        block.fill_(1.0)  # touches all 1,954 pages
        del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Served by fresh mmaps, the 20 blocks fault in all their 39,000 pages. Kept on the heap they
    # fault in almost none (0 when run alone; a few blocks' worth next to other test modules).
    assert faults < 20 * 1954 // 2


def _anon_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))


def _kept_then_released() -> tuple[float, float, float]:
    """In a fresh process: RssAnon before a 300 MiB peak of heap blocks, after freeing them, after releasing."""
    from fastif.allocator import keep_freed_memory, release_freed_memory

    keep_freed_memory()
    start = _anon_mib()
    blocks = [bytearray(b"x" * 2**20) for _ in range(300)]  # 1 MiB each: from the heap, under the mmap threshold
    del blocks
    kept = _anon_mib()
    release_freed_memory()
    return start, kept, _anon_mib()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_one_time_peak_is_handed_back_after_it():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        start, kept, released = pool.apply(_kept_then_released)
    assert kept - start > 250  # held: the thresholds keep freed memory mapped
    assert released - start < 50, (start, kept, released)  # handed back
