"""The faiss index over the training set and the nearest-neighbour query that picks the candidates.

Two spaces to search:

- ``gradient`` (the default): each example's key is the loss gradient of the model's
  output layer, and the candidates are the examples whose key has the largest inner
  product with the test input's, of either sign. Influence is -⟨∇L(z), s_test⟩, and
  the examples at both ends of it are those whose gradients are large and aligned
  with the test input's (for better or worse): on SST-2 with MiniLM, FastIF's
  feature neighbours held about a quarter of the 10 most influential of 10,000
  examples at k = 1,000, the gradient keys nearly all of them (bench/results/recall.md).
- ``feature``: FastIF's own choice, the first-token final-layer features under L2.

For a softmax output layer W (C × A) on input a, ∇_W ℓ(z) = (p − e_y) aᵀ. Since
p − e_y sums to zero, its coordinates in an orthonormal basis of the vectors that
sum to zero keep every inner product, so the key (Bᵀ(p − e_y)) ⊗ a has (C − 1)·A
entries and ⟨key(z), key(z')⟩ = ⟨∇_W ℓ(z), ∇_W ℓ(z')⟩ exactly.

The index (``build_index``): exact Flat by default up to AUTO_FLAT_MAX_EXAMPLES; above, IVF
whose ``nprobe`` is the least (to an eighth of a power of two) that finds at least
``recall_target`` of a Flat search's 1,000 neighbours of fixed training keys, both sides
searched as ``search`` does.

An IVF in the gradient space holds the keys lifted onto a sphere (``SphereLift``) and searches
them under L2, which finds the largest inner products; its cells are then cells of directions.
faiss's own inner-product IVF assigns and probes cells by ⟨key, centroid⟩, which favours the
cells of long keys, and wanted about twice the probes for the same recall (500K MiniLM keys,
2,828 cells, recall@1000 of both sides, in memory on one core: lifted 0.956 at 448 probes and
0.967 at 512, 0.017 s a query; inner product 0.920 at 512 and 0.991 at 1,024, 0.038 s).
``index_report`` says what an index is and measures that recall. A build keeps its index with
``write_index`` (an IVF's lists written straight to a file, never whole in memory) and workers
open it with ``load_index``, mapped read-only from the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .config import IndexConfig

HNSW_EF_SEARCH = 128  # the least search depth of an HNSW query (see _search)

# ``kind: "auto"``: the exact Flat index up to this many training examples, IVF above. A Flat
# search costs N·D per query and side: on one core, 210K keys of 384 numbers (a binary MiniLM)
# took 0.037 s for both sides, the "auto" IVF 0.009 s (synthetic clustered keys of either sign:
# nlist 1833, nprobe 256, recall@1000 0.976, built in 33 s).
AUTO_FLAT_MAX_EXAMPLES = 200_000
# The k of the recall an approximate index is measured at: the service's default k.
RECALL_AT = 1000
# Training keys searched as queries to measure that recall.
RECALL_QUERIES = 64
# The seed of the rows a build samples (recall queries, IVF training points): fixed, so that
# the same vectors give the same index and the same measured recall.
SAMPLE_SEED = 0
# Points per IVF cell in the sample "auto" trains its centroids on: above the 39 under which
# faiss's k-means warns, a quarter of the 256 faiss would subsample to; k-means costs grow
# with the sample, and coarser cells are made up for by the nprobe the build chooses.
TRAINING_POINTS_PER_CELL = 64
# Rows added to an IVF index built on disk at a time (``write_index``): 96 MiB of 384-number keys.
ADD_CHUNK = 65_536
# How ``load_index`` opens an index: its vectors (a Flat's or HNSW's, an IVF's lists) mapped from the file;
# an IVF built on disk, its lists file found beside it wherever the state volume is mounted.
MAPPED = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
ON_DISK_LISTS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


@dataclass(frozen=True)
class IndexReport:
    """What a build chose, and how much of the exact (Flat) neighbours it finds.

    ``recall_at_1000``: the share of the Flat index's min(1000, N) neighbours of a training
    key that ``search`` finds, averaged over ``queries`` training keys; an index whose
    metric is the inner product is searched on both sides, as every influence query does.
    A Flat index is exact: its recall is 1 and nothing is measured (``queries`` 0).
    """

    kind: str  # flat | ivf | hnsw: what was built (an "auto" request resolved)
    nlist: int | None  # IVF cells
    nprobe: int | None  # IVF cells searched per query
    recall_at_1000: float
    queries: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchQuery:
    """What a kNN query needs of one test input (or of a group's mean)."""

    key: np.ndarray  # [D]: in the index's space (gradient key, or the feature itself)
    feature: np.ndarray  # [H]: first-token feature, for the L2 distance reported with each candidate


def zero_sum_basis(classes: int) -> np.ndarray:
    """Orthonormal columns spanning the vectors of ``classes`` entries that sum to zero (Helmert), [C, C-1]."""
    basis = np.zeros((classes, classes - 1), dtype=np.float64)
    for j in range(1, classes):
        basis[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        basis[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return basis


def gradient_keys(probs: np.ndarray, labels: np.ndarray, head_inputs: np.ndarray) -> np.ndarray:
    """Keys whose inner products are those of the output layer's per-example loss gradients, [N, (C-1)·A]."""
    probs = np.asarray(probs, dtype=np.float64)
    residual = probs.copy()
    residual[np.arange(len(probs)), np.asarray(labels, dtype=np.int64)] -= 1.0  # p - e_y
    coordinates = residual @ zero_sum_basis(probs.shape[1])  # [N, C-1]
    keys = coordinates[:, :, None] * np.asarray(head_inputs, dtype=np.float64)[:, None, :]
    return np.ascontiguousarray(keys.reshape(len(probs), -1), dtype=np.float32)


def default_nlist(n: int) -> int:
    """IVF cells for N vectors: 4·√N (the low end of faiss's 4·√N … 16·√N, since a query wants
    a thousand neighbours, spread over many cells), with at least 39 training points per cell."""
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


class SphereLift:
    """Keys of an inner-product IVF lifted onto a sphere of radius R, the longest key's norm (Bachrach et al.,
    2014): x -> [x, √(R² − ‖x‖²)], and a query q -> [q, 0], so that ‖q' − x'‖² = ‖q‖² + R² − 2⟨q, x⟩ and the
    nearest lifted keys under L2 are the largest inner products.

    Indexed like the keys' array (``lift[a:b]``, ``lift[rows]``), it gives lifted float32 rows, a chunk at a
    time, so that an index built on disk still never holds the keys in memory.
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.shape = (len(vectors), vectors.shape[1] + 1)
        self.radius_squared = max((float(np.einsum("ij,ij->i", keys, keys).max())
                                   for keys in map(self._keys, _chunks(len(vectors))) if len(keys)), default=0.0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        keys = self._keys(rows)
        height = np.sqrt(np.maximum(self.radius_squared - np.einsum("ij,ij->i", keys, keys), 0.0))
        return np.hstack([keys, height[:, None].astype(np.float32)])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:].astype(dtype or np.float32, copy=False)

    def _keys(self, rows) -> np.ndarray:
        if isinstance(rows, range):
            rows = slice(rows.start, rows.stop)
        return np.ascontiguousarray(self.vectors[rows], dtype=np.float32)

    @staticmethod
    def query(keys: np.ndarray) -> np.ndarray:
        """Queries [q, D] as the lifted index searches them: [q, 0]."""
        return np.hstack([keys, np.zeros((len(keys), 1), dtype=np.float32)])


def lifted(index: faiss.Index, dim: int) -> bool:
    """Whether ``index`` holds keys of ``dim`` numbers lifted onto a sphere (``SphereLift``): an inner-product
    IVF, searched under L2 with one number more than its keys."""
    return index.metric_type == faiss.METRIC_L2 and index.d == dim + 1


def inner_product(index: faiss.Index, dim: int) -> bool:
    """Whether ``index`` over keys of ``dim`` numbers ranks by their inner product (the gradient space)."""
    return index.metric_type == faiss.METRIC_INNER_PRODUCT or lifted(index, dim)


def build_index(vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Exact search (Flat) up to AUTO_FLAT_MAX_EXAMPLES by default; IVF or HNSW trade exactness for speed at large N.

    L2 in the feature space, inner product in the gradient space. ``auto`` above the size
    trains IVF on a sample and sets its ``nprobe`` to the least power of two whose recall
    (``measure_recall``) reaches ``config.recall_target``; an explicit ``ivf`` keeps
    ``config.nprobe``. The index holds its vectors in this process's memory: ``write_index``
    builds one on disk.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index, held = _trained(vectors, config)
    index.add(np.asarray(held))
    _tune(index, vectors, config)
    return index


def write_index(vectors: np.ndarray, config: IndexConfig, path: Path) -> faiss.Index:
    """``build_index``'s index, written to ``path`` and returned as ``load_index`` maps it: read-only, from the file.

    An IVF index is built on disk: ``auto``'s training sample in a scratch file, its lists straight into
    their file (``_fill_lists_file``), so that its build holds a chunk of ``vectors`` in memory however
    large N is (500K MiniLM keys: 730 MiB). A Flat or HNSW index is built in memory and let go once written.
    """
    index, held = _trained(vectors, config, scratch=path.with_name(path.name + ".sample.npy"))
    if isinstance(index, faiss.IndexIVF):
        _fill_lists_file(index, held, ivf_data_file(path))
    else:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _tune(index, vectors, config)
    partial = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(partial))
    del index
    os.replace(partial, path)  # atomic: a reader sees the whole index or none
    return load_index(path)


def _held(index: faiss.Index, vectors: np.ndarray) -> np.ndarray | SphereLift:
    """The rows ``index`` holds of ``vectors``: lifted onto a sphere for a lifted IVF, else themselves."""
    return SphereLift(vectors) if lifted(index, vectors.shape[1]) else vectors


def _chunks(n: int) -> list[range]:
    return [range(start, min(start + ADD_CHUNK, n)) for start in range(0, n, ADD_CHUNK)]


def _fill_lists_file(index: faiss.IndexIVF, vectors: np.ndarray | SphereLift, lists_file: Path) -> None:
    """Every row of ``vectors`` into ``index``'s lists, held in ``lists_file`` (faiss's OnDiskInvertedLists).

    Two passes of ADD_CHUNK rows: the cells first, so that each list is allocated once at its final
    size (appended to, the lists file doubled each list as it grew, to 3.5 times the vectors' bytes),
    then each list's rows written in row order: the entries ``index.add`` makes (which assigns its
    rows in blocks of 65,536, ADD_CHUNK's default, so the two find the same cells).
    """
    chunks = _chunks(len(vectors))
    cells = np.concatenate([index.quantizer.assign(_rows(vectors, rows), 1).ravel() for rows in chunks])
    lists_file.unlink(missing_ok=True)  # a build that stopped midway left it
    lists = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(lists_file))
    sizes = np.bincount(cells, minlength=index.nlist).astype(np.uint64)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # each list's place in the file, back to back
    lists.update_totsize(int(sizes.sum()) * (index.code_size + 8))  # the file at its final size (ids: 8 bytes)
    written = np.zeros(index.nlist, dtype=np.int64)
    for rows in chunks:
        chunk, owners = _rows(vectors, rows), cells[rows.start : rows.stop]
        order = np.argsort(owners, kind="stable")
        bounds = np.searchsorted(owners[order], np.arange(index.nlist + 1))
        for cell in np.flatnonzero(np.diff(bounds)):
            members = order[bounds[cell] : bounds[cell + 1]]
            ids, codes = members + rows.start, np.ascontiguousarray(chunk[members]).view(np.uint8)
            lists.update_entries(int(cell), int(written[cell]), len(members), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            written[cell] += len(members)
    index.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) it
    index.ntotal = len(vectors)


def _rows(vectors: np.ndarray | SphereLift, rows: range) -> np.ndarray:
    return np.ascontiguousarray(vectors[rows.start : rows.stop], dtype=np.float32)


def ivf_data_file(path: Path) -> Path:
    """Where the lists of the IVF index written to ``path`` lie (faiss finds them beside it on load)."""
    return path.with_name(path.name + ".ivfdata")


def _trained(vectors: np.ndarray, config: IndexConfig,
             scratch: Path | None = None) -> tuple[faiss.Index, np.ndarray | SphereLift]:
    """The empty index ``config`` asks for over ``vectors``, trained where it needs training (IVF's cells), and the
    rows it is to hold (``_held``: lifted once, so that the keys' norms are read once).

    ``scratch``: a file to hold ``auto``'s training sample while it trains, instead of memory (at 500K
    MiniLM keys the sample is 181K rows, 278 MiB).
    """
    n, dim = vectors.shape
    inner_product = config.space == "gradient"
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    flat = faiss.IndexFlatIP if inner_product else faiss.IndexFlatL2
    auto = config.kind == "auto"
    kind = ("flat" if n <= AUTO_FLAT_MAX_EXAMPLES else "ivf") if auto else config.kind
    if kind == "flat" or (kind == "ivf" and n < 256):
        return flat(dim), vectors
    if kind == "ivf":
        nlist = config.nlist or default_nlist(n)
        if inner_product:  # L2 cells of the keys lifted onto a sphere (see the module's docstring)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim + 1), dim + 1, nlist, faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFFlat(flat(dim), dim, nlist, metric)
        held = _held(index, vectors)
        if auto:
            sample = _training_sample(held, nlist, scratch)
            index.train(sample)
            del sample
            if scratch is not None:
                scratch.unlink(missing_ok=True)
        else:
            index.train(np.ascontiguousarray(held, dtype=np.float32))
        index.nprobe = min(config.nprobe, nlist)
        return index, held
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, config.hnsw_m, metric), vectors
    raise ValueError(f"unknown index kind '{config.kind}'")


def _tune(index: faiss.Index, vectors: np.ndarray, config: IndexConfig) -> None:
    """``auto``'s IVF: the nprobe that reaches the recall target, measured on the filled index."""
    if config.kind == "auto" and isinstance(index, faiss.IndexIVF):
        _choose_nprobe(index, RecallSample.of(vectors, config.space == "gradient"), config.recall_target)


def _training_sample(vectors: np.ndarray | SphereLift, nlist: int, scratch: Path | None = None) -> np.ndarray:
    """TRAINING_POINTS_PER_CELL · nlist rows drawn without replacement (all of them when fewer), in row order;
    copied into a memory map of ``scratch`` when given."""
    size = min(len(vectors), TRAINING_POINTS_PER_CELL * nlist)
    if size == len(vectors):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(vectors), size=size, replace=False))
    if scratch is None:
        return np.ascontiguousarray(vectors[rows], dtype=np.float32)
    sample = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(size, vectors.shape[1]))
    for start in range(0, size, ADD_CHUNK):
        sample[start : start + ADD_CHUNK] = vectors[rows[start : start + ADD_CHUNK]]
    return sample


def _choose_nprobe(index: faiss.IndexIVF, sample: RecallSample, target: float) -> None:
    """The least nprobe whose measured recall reaches ``target``, to an eighth of a power of two: the least of 1, 2,
    4, … that does, then halved towards the one before (recall grows with nprobe: more cells, more keys
    scanned); nlist (every cell: exact) at most.

    A query costs about nprobe, and the count a target needs lies anywhere between two powers of two;
    each step costs one recall measurement (at 500K keys and 512 probes, about a second).
    """
    def reaches(nprobe: int) -> bool:
        index.nprobe = min(nprobe, index.nlist)
        return index.nprobe == index.nlist or sample.recall(index) >= target

    nprobe = 1
    while not reaches(nprobe):
        nprobe *= 2
    low, step = nprobe // 2, max(1, nprobe // 8)  # low fails (or is 0); nprobe reaches
    while nprobe - low > step:
        middle = low + (nprobe - low) // 2 // step * step
        if reaches(middle):
            nprobe = middle
        else:
            low = middle
    index.nprobe = min(nprobe, index.nlist)


@dataclass(frozen=True)
class RecallSample:
    """Fixed training keys as queries, with their exact neighbours from a brute-force search over every vector."""

    keys: np.ndarray  # [q, D]
    exact: list[np.ndarray]  # per query: the ids the Flat index's ``search`` returns, strongest first
    k: int

    @classmethod
    def of(cls, vectors: np.ndarray, inner_product: bool) -> RecallSample:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(vectors)
        rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=min(n, RECALL_QUERIES), replace=False))
        keys = np.ascontiguousarray(vectors[rows])
        if inner_product:  # a zero key ranks every example alike: there are no neighbours to find
            keys = keys[np.linalg.norm(keys, axis=1) > 0]
        k = min(RECALL_AT, n)
        if not inner_product:
            _, ids = faiss.knn(keys, vectors, k, faiss.METRIC_L2)
            return cls(keys, list(ids), k)
        # both ends of the inner product, merged as ``search`` merges them
        aligned, aligned_ids = faiss.knn(keys, vectors, k, faiss.METRIC_INNER_PRODUCT)
        opposed, opposed_ids = faiss.knn(-keys, vectors, k, faiss.METRIC_INNER_PRODUCT)
        exact = [_strongest_of_both(aligned[i], aligned_ids[i], opposed[i], opposed_ids[i], k) for i in range(len(keys))]
        return cls(keys, exact, k)

    def recall(self, index: faiss.Index) -> float:
        """The mean share of each query's exact neighbours that ``search`` finds in ``index``."""
        if not len(self.keys):
            return 1.0
        found = [np.intersect1d(search(index, key, self.k), exact).size / max(1, len(exact))
                 for key, exact in zip(self.keys, self.exact)]
        return float(np.mean(found))


def measure_recall(index: faiss.Index, vectors: np.ndarray) -> tuple[float, int]:
    """recall@min(1000, N) of ``index`` against the exact neighbours of RECALL_QUERIES training keys, and the queries used.

    ``vectors`` are the ones the index holds. The queries are searched as ``search`` searches
    (both ends of the inner product in the gradient space).
    """
    sample = RecallSample.of(vectors, inner_product(index, vectors.shape[1]))
    return sample.recall(index), len(sample.keys)


def index_report(index: faiss.Index, vectors: np.ndarray) -> IndexReport:
    """What ``index`` is (as built or loaded) and its measured recall; a Flat index is exact and measures nothing."""
    if isinstance(index, faiss.IndexFlat):
        return IndexReport(kind="flat", nlist=None, nprobe=None, recall_at_1000=1.0, queries=0)
    recall, queries = measure_recall(index, vectors)
    if isinstance(index, faiss.IndexIVF):
        return IndexReport(kind="ivf", nlist=index.nlist, nprobe=index.nprobe, recall_at_1000=recall, queries=queries)
    if isinstance(index, faiss.IndexHNSW):
        return IndexReport(kind="hnsw", nlist=None, nprobe=None, recall_at_1000=recall, queries=queries)
    raise ValueError(f"no report for a faiss index of type {type(index).__name__}")


def load_index(path: Path) -> faiss.Index:
    """The index at ``path``, its vectors mapped read-only from the file (an IVF's from the lists file beside it):
    the page cache holds them once for every worker on the machine, not each worker's own memory."""
    if not ivf_data_file(path).is_file():
        return faiss.read_index(str(path), MAPPED)
    index = faiss.read_index(str(path), ON_DISK_LISTS)
    # faiss's on-disk lists start 32 threads per search to fault the probed lists in ahead of the scan: on one
    # core, 500K MiniLM keys (2,828 cells, 512 probed) took 0.026 s a query with them, 0.015 s without.
    faiss.downcast_InvertedLists(index.invlists).prefetch_nthread = 0
    return index


def _search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if isinstance(index, faiss.IndexHNSW):
        # faiss's HNSW explores only efSearch (default 16) candidates whatever k is: recall@100 on
        # clustered 32-d features was 0.57. Search at least max(HNSW_EF_SEARCH, 2k) deep (0.98 there).
        params = faiss.SearchParametersHNSW(efSearch=max(index.hnsw.efSearch, HNSW_EF_SEARCH, 2 * k))
        return index.search(queries, k, params=params)
    return index.search(queries, k)


SIDES = ("both", "aligned", "opposed")


def search(index: faiss.Index, key: np.ndarray, k: int, side: str = "both") -> np.ndarray:
    """The k training examples nearest to ``key`` [D] in the index's space, nearest first.

    Feature space: smallest L2 distance (``side`` has no meaning there). Gradient space:
    ``aligned`` the largest inner products (the side of helpful examples, since influence
    is -⟨∇L(z), s_test⟩), ``opposed`` the most negative ones (harmful), ``both`` the k
    largest in absolute value of the two.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    key = np.asarray(key, dtype=np.float32).reshape(1, -1)
    if not inner_product(index, key.shape[1]):
        _, indices = _search(index, key, k)
        return indices[0][indices[0] >= 0]
    if side != "both":
        _, ids = _products(index, key if side == "aligned" else -key, k)
        return ids[0][ids[0] >= 0]
    aligned, aligned_ids = _products(index, key, k)
    opposed, opposed_ids = _products(index, -key, k)
    return _strongest_of_both(aligned[0], aligned_ids[0], opposed[0], opposed_ids[0], k)


def _products(index: faiss.Index, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest inner products with each of ``keys`` [q, D]: their values, up to a shift shared by every key
    of the same norm (a lifted index's -‖q' − x'‖² = 2⟨q, x⟩ − ‖q‖² − R²), and their ids."""
    if lifted(index, keys.shape[1]):
        distances, ids = _search(index, SphereLift.query(keys), k)
        return -distances, ids
    return _search(index, keys, k)


def _strongest_of_both(aligned: np.ndarray, aligned_ids: np.ndarray, opposed: np.ndarray, opposed_ids: np.ndarray,
                       k: int) -> np.ndarray:
    """The k ids of largest |⟨key_i, key⟩| from the two searches' results (⟨·, key⟩ and ⟨·, -key⟩, shifted alike),
    strongest first."""
    ids = np.concatenate([aligned_ids, opposed_ids])
    strength = np.concatenate([aligned, opposed])  # |⟨key_i, key⟩| of each
    keep = ids >= 0
    ids, strength = ids[keep], strength[keep]
    order = np.argsort(-strength, kind="stable")
    _, first = np.unique(ids[order], return_index=True)  # an example with ⟨·,·⟩ = 0 may come back twice
    return ids[order][np.sort(first)][:k]
