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
