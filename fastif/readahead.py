"""Scattered rows of an array mapped from a file, asked of the disk all at once before they are read.

A query reads its candidates' rows (their activations, their features) from arrays mapped from
files that may be larger than what the page cache keeps: 500K examples' float16 activations take
5.3 GB. A row that the cache lacks is read on its first touch, and each such read waits for the
disk alone: 1,000 candidates, 1,000 reads one after another. ``will_need`` tells the kernel about
every row first (``posix_fadvise(POSIX_FADV_WILLNEED)``, which starts the reads and returns), so
that the disk serves them together while the query goes on.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

import numpy as np

# Ranges of the file closer than this are asked for as one: a syscall apiece costs more than the gap.
MERGE_GAP_BYTES = 64 * 1024


def will_need(array: np.ndarray, row_ranges: Iterable[tuple[int, int]]) -> int:
    """Start reading rows [start, end) of each range of ``array`` into the page cache, where ``array`` is a whole
    C-ordered array mapped from its file (``np.load(..., mmap_mode=...)``); nothing otherwise. Returns how many
    ranges of the file were asked for."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
            and array.filename and hasattr(os, "posix_fadvise") and array.ndim):
        return 0
    row_bytes = array.strides[0]
    spans = sorted((array.offset + start * row_bytes, array.offset + end * row_bytes)
                   for start, end in row_ranges if end > start)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + MERGE_GAP_BYTES:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return 0
    descriptor = os.open(array.filename, os.O_RDONLY)
    try:
        for start, end in merged:
            os.posix_fadvise(descriptor, start, end - start, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(descriptor)
    return len(merged)


def will_need_rows(array: np.ndarray, rows: Iterable[int]) -> int:
    """``will_need`` of single rows."""
    return will_need(array, ((int(row), int(row) + 1) for row in rows))
