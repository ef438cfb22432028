"""The index as a build writes it and a query loads it: vectors on disk, mapped read-only, never copied into memory.

An IVF index is built on disk (its lists grow in a file beside it, a chunk of vectors at a time) and must
answer exactly as the same index built in memory; every index is loaded mapped from its file, so that a
worker's own (anonymous) memory does not grow with the training set.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

import faiss
from fastif import IndexConfig, knn


def clustered(n: int, dim: int = 32, centres: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middles = rng.normal(scale=4.0, size=(centres, dim))
    return (middles[rng.integers(centres, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def anonymous_mib() -> float:
    """This process's resident anonymous memory (heap, not file pages)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnonymous:
    """The most anonymous memory this process held above its start, sampled every few milliseconds while in use
    (faiss lets go of the GIL while it works)."""

    def __enter__(self) -> PeakAnonymous:
        self.start, self.peak, self._stop = anonymous_mib(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anonymous_mib() - self.start)

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_mib() - self.start)


def on_disk_vectors(path, data: np.ndarray) -> np.ndarray:
    """``data`` as a build hands it over: a read-only memory map of the staged file."""
    np.save(path, data)
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("space", ["feature", "gradient"])
def test_an_ivf_index_built_on_disk_answers_as_one_built_in_memory(space, tmp_path, monkeypatch):
    monkeypatch.setattr(knn, "ADD_CHUNK", 700)  # several chunks, the last one short
    data = clustered(5_000, seed=1)
    config = IndexConfig(kind="ivf", space=space, nlist=64, nprobe=8)
    in_memory = knn.build_index(data, config)
    path = tmp_path / "index.faiss"
    on_disk = knn.write_index(on_disk_vectors(tmp_path / "keys.npy", data), config, path)
    lists = faiss.downcast_InvertedLists(on_disk.invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert lists.prefetch_nthread == 0  # no threads started per search (knn.load_index)
    assert knn.ivf_data_file(path).stat().st_size >= data.nbytes  # the vectors are in the lists file
    assert not path.with_name(path.name + ".partial").exists()
    assert (on_disk.ntotal, on_disk.nlist, on_disk.nprobe) == (5_000, 64, 8)
    for query in clustered(20, seed=2):
        assert np.array_equal(knn.search(on_disk, query, 50), knn.search(in_memory, query, 50))


def test_auto_ivf_on_disk_chooses_the_same_nprobe(tmp_path, monkeypatch):
    monkeypatch.setattr(knn, "AUTO_FLAT_MAX_EXAMPLES", 1_000)
    monkeypatch.setattr(knn, "ADD_CHUNK", 1_024)
    data = clustered(6_000, seed=3)
    in_memory = knn.build_index(data, IndexConfig(space="feature"))
    on_disk = knn.write_index(data, IndexConfig(space="feature"), tmp_path / "index.faiss")
    assert isinstance(on_disk, faiss.IndexIVFFlat) and on_disk.nprobe == in_memory.nprobe > 1
    assert knn.index_report(on_disk, data) == knn.index_report(in_memory, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.faiss.ivfdata"]  # the sample's file is gone
    for query in clustered(20, seed=4):  # trained on the same sample, held in a file instead of memory
        assert np.array_equal(knn.search(on_disk, query, 100), knn.search(in_memory, query, 100))


def peaks_in_a_fresh_process(kind: str, folder: str) -> tuple[float, float, float, float, bool]:
    """Run in a process of its own, whose heap holds nothing freed by earlier tests that a build could reuse:
    the data's MiB and the peaks of writing, loading and building in memory; whether all three find the same."""
    knn.ADD_CHUNK = 8_192
    path = Path(folder)
    data = on_disk_vectors(path / "keys.npy", clustered(200_000, dim=128, seed=4))  # 98 MiB
    config = IndexConfig(kind=kind, space="feature", nlist=256)
    with PeakAnonymous() as building:
        written = knn.write_index(data, config, path / f"{kind}.faiss")
    with PeakAnonymous() as loading:
        again = knn.load_index(path / f"{kind}.faiss")
    with PeakAnonymous() as in_memory:
        built = knn.build_index(data, config)
    query = np.asarray(data[123])
    same = knn.search(again, query, 10)[0] == knn.search(written, query, 10)[0] == knn.search(built, query, 10)[0] == 123
    return data.nbytes / 2**20, building.peak, loading.peak, in_memory.peak, bool(same)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_written_index_leaves_its_vectors_out_of_the_process_memory(kind, tmp_path):
    """Loaded, an index is mapped from its file; an IVF is built on disk too. The same index built in memory
    holds its vectors in the heap (what the test tells apart)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        size_mib, building, loading, in_memory, same = pool.apply(peaks_in_a_fresh_process, (kind, str(tmp_path)))
    assert same
    assert in_memory > 0.9 * size_mib
    if kind == "ivf":  # it holds faiss's k-means sample (256 rows a cell), each row's cell and a chunk's distances
        sample_mib = min(200_000, 256 * 256) * 128 * 4 / 2**20
        assert building < sample_mib + 0.15 * size_mib
    else:  # built in memory, then let go
        assert building < 1.1 * size_mib
    assert loading < 0.05 * size_mib
