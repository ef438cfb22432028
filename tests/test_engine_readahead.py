"""Scattered rows of a mapped file asked of the disk at once (fastif/readahead.py): the byte ranges handed to
``posix_fadvise`` must be the rows' own bytes in the file, read back here from the file itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fastif import readahead
from fastif.prefix import PrefixStore


@pytest.fixture
def advised(monkeypatch):
    """The (file, offset, length, advice) of every posix_fadvise call, passed on to the real one."""
    calls = []
    real = os.posix_fadvise

    def record(descriptor, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{descriptor}"), offset, length, advice))
        return real(descriptor, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def covered_bytes(calls) -> set[int]:
    return {byte for _, offset, length, _ in calls for byte in range(offset, offset + length)}


def row_bytes(array: np.memmap, start: int, end: int) -> range:
    return range(array.offset + start * array.strides[0], array.offset + end * array.strides[0])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_the_advised_ranges_are_the_rows_bytes_in_the_file(tmp_path, advised, monkeypatch):
    monkeypatch.setattr(readahead, "MERGE_GAP_BYTES", 0)  # only touching ranges merge
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(4000 * 96, dtype=np.float32).reshape(4000, 96))  # 384-byte rows
    array = np.load(path, mmap_mode="r")
    ranges = [(3000, 3002), (10, 11), (11, 13), (500, 500)]  # out of order, two touching, one empty
    assert readahead.will_need(array, ranges) == 2
    assert {call[0] for call in advised} == {str(path.resolve())} and {call[3] for call in advised} == {os.POSIX_FADV_WILLNEED}
    wanted = set(row_bytes(array, 10, 13)) | set(row_bytes(array, 3000, 3002))
    assert covered_bytes(advised) == wanted
    # read back from the file: the advised bytes are those rows' numbers
    raw = path.read_bytes()
    for _, offset, length, _ in advised:
        numbers = np.frombuffer(raw[offset : offset + length], dtype=np.float32).reshape(-1, 96)
        first_row = int(numbers[0, 0]) // 96
        assert np.array_equal(numbers, np.asarray(array[first_row : first_row + len(numbers)]))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_near_ranges_go_as_one_and_arrays_not_mapped_whole_go_not_at_all(tmp_path, advised):
    path = tmp_path / "rows.npy"
    np.save(path, np.zeros((4000, 8), dtype=np.float64))  # 64-byte rows
    array = np.load(path, mmap_mode="r")
    assert readahead.will_need_rows(array, [3000, 0, 2, 4]) == 2  # 0..4 lie within the gap; 3000 (192 KB on) does not
    assert covered_bytes(advised) == set(row_bytes(array, 0, 5)) | set(row_bytes(array, 3000, 3001))
    advised.clear()
    assert readahead.will_need_rows(np.zeros((10, 8)), [1, 2]) == 0  # in memory
    assert readahead.will_need_rows(array[5:], [1, 2]) == 0  # a view: its offset is not its file's
    assert readahead.will_need_rows(array, []) == 0
    assert advised == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_the_prefix_store_asks_for_its_examples_activations(tmp_path, advised, monkeypatch):
    monkeypatch.setattr(readahead, "MERGE_GAP_BYTES", 0)
    lengths = [3, 5, 2, 7, 4]
    store = PrefixStore.allocate(lengths, hidden=16, dtype="float16", folder=tmp_path)
    store.flush()
    loaded = PrefixStore.load(tmp_path, "float16")
    loaded.will_need([3, 0])
    offsets = loaded.offsets
    assert covered_bytes(advised) == set(row_bytes(loaded.flat, offsets[0], offsets[1])) | set(
        row_bytes(loaded.flat, offsets[3], offsets[4]))
