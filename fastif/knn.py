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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .config import IndexConfig

HNSW_EF_SEARCH = 128  # the least search depth of an HNSW query (see _search)


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


def build_index(vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Exact search (Flat) by default; IVF or HNSW trade exactness for speed at large N.

    L2 in the feature space, inner product in the gradient space.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    inner_product = config.space == "gradient"
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    flat = faiss.IndexFlatIP if inner_product else faiss.IndexFlatL2
    if config.kind == "flat" or (config.kind == "ivf" and n < 256):
        index = flat(dim)
    elif config.kind == "ivf":
        nlist = config.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(flat(dim), dim, nlist, metric)
        index.train(vectors)
        index.nprobe = min(config.nprobe, nlist)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, metric)
    else:
        raise ValueError(f"unknown index kind '{config.kind}'")
    index.add(vectors)
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


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
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        _, indices = _search(index, key, k)
        return indices[0][indices[0] >= 0]
    if side != "both":
        _, ids = _search(index, key if side == "aligned" else -key, k)
        return ids[0][ids[0] >= 0]
    aligned, aligned_ids = _search(index, key, k)
    opposed, opposed_ids = _search(index, -key, k)
    ids = np.concatenate([aligned_ids[0], opposed_ids[0]])
    strength = np.concatenate([aligned[0], opposed[0]])  # |⟨key_i, key⟩| of each
    keep = ids >= 0
    ids, strength = ids[keep], strength[keep]
    order = np.argsort(-strength, kind="stable")
    _, first = np.unique(ids[order], return_index=True)  # an example with ⟨·,·⟩ = 0 may come back twice
    return ids[order][np.sort(first)][:k]
