"""Forward passes without gradients: a whole labelled set, or a query's test inputs, encoded once.

A set gives each example's first-token feature, its gradient key (fastif/knn.py) and
the frozen prefix's activations; test inputs give their predictions, the labels the
gradients use, features and search keys, and the prefix's activations for their
gradients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import knn
from .artefacts import search_vectors
from .curvature.kfac import GradientFactors
from .data import resolve_label
from .encoding import Tokenized, collate, length_batches, tokenize
from .errors import CancelledError
from .factored import FactoredScores
from .knn import SearchQuery
from .objective import InfluenceObjective
from .prefix import PrefixStore
from .prepared_model import PreparedModel
from .progress import ProgressCallback
from .query import Query


@dataclass
class EncodedSet:
    """Features, search keys and cached prefix activations of a whole set of labelled examples."""

    features: np.ndarray  # [N, H]
    gradient_keys: np.ndarray  # [N, (C-1)·A]
    prefix: PrefixStore | None

    def flush(self) -> None:
        """What was written to memory maps, on disk."""
        for array in (self.features, self.gradient_keys):
            if isinstance(array, np.memmap):
                array.flush()
        if self.prefix is not None:
            self.prefix.flush()


@dataclass
class EncodedQueries:
    """What one forward pass over the test inputs gives."""

    probs: np.ndarray  # [q, C]
    labels_used: list[int]
    features: np.ndarray  # [q, H]
    tokens: Tokenized
    search_keys: np.ndarray  # [q, D]: kNN keys in the index's space (fastif/knn.py)
    hidden: torch.Tensor | None = None  # [q, T, H]: the frozen prefix's output, when it is cached

    def search(self, row: int) -> SearchQuery:
        return SearchQuery(key=self.search_keys[row], feature=self.features[row])


def allocate_set(model: PreparedModel, tokens: Tokenized, folder: Path | None = None, prefix_dtype: str = "float32",
                 keep_prefix: bool = True) -> EncodedSet:
    """Room for a set's features, gradient keys and (``keep_prefix``) prefix activations.

    In ``folder``: ``.npy`` memory maps that ``encode_set`` fills batch by batch, so that a
    build holds a few batches at a time whatever the set's size; else arrays in memory.
    """
    count = len(tokens)
    key_width = (len(model.classifier.labels) - 1) * model.output_layer.in_features

    def array(name: str, width: int) -> np.ndarray:
        if folder is None:
            return np.zeros((count, width), dtype=np.float32)
        return np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float32, shape=(count, width))

    prefix = None
    if model.prefix is not None and keep_prefix:
        prefix = PrefixStore.allocate(tokens.lengths, model.model.config.hidden_size, prefix_dtype, folder)
    return EncodedSet(features=array("features.npy", model.model.config.hidden_size),
                      gradient_keys=array("gradient_keys.npy", key_width), prefix=prefix)


def open_set(folder: Path, prefix_dtype: str | None) -> EncodedSet:
    """The arrays ``allocate_set`` made in ``folder``, opened to be written: a staged build's (fastif/staged_build.py)."""
    prefix = None if prefix_dtype is None else PrefixStore.load(folder, prefix_dtype, mode="r+")
    return EncodedSet(features=np.load(folder / "features.npy", mmap_mode="r+"),
                      gradient_keys=np.load(folder / "gradient_keys.npy", mmap_mode="r+"), prefix=prefix)


def encode_set(model: PreparedModel, tokens: Tokenized, pad_id: int, batch_size: int = 64,
               on_progress: ProgressCallback | None = None, stage: str = "features",
               into: EncodedSet | None = None, rows: range | None = None) -> EncodedSet:
    """One forward pass per length bucket over labelled examples: features, gradient keys, prefix activations.

    Written batch by batch into ``into`` (``allocate_set``; in memory when None). ``rows``: only
    these rows (a build's shard), batched among themselves, so that a shard's numbers are the
    same whichever process computes it and whatever else it computes.
    """
    encoded = allocate_set(model, tokens) if into is None else into
    rows = range(len(tokens)) if rows is None else rows
    count = len(rows)
    device = model.classifier.device
    done = 0
    for local in length_batches(tokens.input_ids.lengths[rows.start : rows.stop], batch_size):
        indices = [rows.start + i for i in local]
        captured = model.capture(collate(tokens, indices, pad_id, device))
        encoded.features[indices] = captured.features.float().cpu().numpy()
        probs = torch.softmax(captured.logits.double(), dim=-1).cpu().numpy()
        head_inputs = captured.head_inputs.float().cpu().numpy()
        encoded.gradient_keys[indices] = knn.gradient_keys(probs, tokens.labels[indices].numpy(), head_inputs)
        if encoded.prefix is not None:
            for row, i in enumerate(indices):
                encoded.prefix.write(i, captured.hidden[row, : len(tokens.input_ids[i])])
        done += len(indices)
        if on_progress and on_progress(stage, done, count):
            raise CancelledError(f"cancelled while computing {stage}")
    if isinstance(encoded.features, np.memmap):
        encoded.flush()
    return encoded


def encode_queries(model: PreparedModel, queries: Sequence[Query], max_length: int, pad_id: int,
                   space: str) -> EncodedQueries:
    """Predictions, the labels the gradients use, and kNN keys (in the index's ``space``) of the test inputs."""
    classifier = model.classifier
    given = [None if q.label is None else resolve_label(q.label, classifier.label2id, f"input {i}")
             for i, q in enumerate(queries)]
    pairs = [q.text_pair or "" for q in queries] if any(q.text_pair for q in queries) else None
    tokens = tokenize(classifier.tokenizer, [q.text for q in queries], pairs, [-1] * len(queries), max_length)
    captured = model.capture(collate(tokens, list(range(len(queries))), pad_id, classifier.device))
    probs = torch.softmax(captured.logits.double(), dim=-1).cpu().numpy()
    labels_used = [g if g is not None else int(p.argmax()) for g, p in zip(given, probs)]
    tokens.labels = torch.as_tensor(labels_used, dtype=torch.long)
    keys = knn.gradient_keys(probs, np.asarray(labels_used), captured.head_inputs.float().cpu().numpy())
    features = captured.features.float().cpu().numpy()
    return EncodedQueries(probs=probs.astype(np.float32), labels_used=labels_used, features=features, tokens=tokens,
                          search_keys=search_vectors(features, keys, space), hidden=captured.hidden)


def test_gradients(objective: InfluenceObjective, encoded: EncodedQueries, pad_id: int,
                   rows: Sequence[int] | None = None) -> torch.Tensor:
    """∇θ L(z_t) of each test input (or of ``rows`` of them) with its label used, [q, P].

    From the frozen prefix's activations that encoding kept, where it is cached: the
    frozen layers then ran once for all inputs, batched, and each gradient runs the rest.
    """
    rows = range(len(encoded.labels_used)) if rows is None else rows
    device = objective.classifier.device
    # Written in place: stacking a list would allocate [q, P] a second time (fresh pages, see hvp).
    grads = torch.empty(len(rows), objective.num_params, dtype=objective.params[0].dtype, device=device)
    for row, i in enumerate(rows):
        batch = collate(encoded.tokens, [i], pad_id, device)
        hidden = None if encoded.hidden is None else encoded.hidden[i : i + 1, : batch.input_ids.shape[1]]
        grads[row] = objective.gradient(batch, hidden)
    return grads


def test_gradient_factors(factored: FactoredScores, encoded: EncodedQueries, pad_id: int,
                          rows: Sequence[int]) -> list[GradientFactors]:
    """Each of ``rows``' gradient of every matrix parameter as factors: position -> (L [out, t], R [in, t]) with
    the gradient L Rᵀ (fastif/factored.py), from one forward and backward of them all.

    A first-token block's is one pair (t = 1), a folded key's or value's one per head; EK-FAC rotates
    them instead of the dense gradient (fastif/curvature/kfac.py ``solved_rows``, which checks each against it).
    """
    batch = collate(encoded.tokens, list(rows), pad_id, factored.params[0].device)
    hidden = encoded.hidden[list(rows), : batch.input_ids.shape[1]]
    uses = factored.factors(batch, hidden)
    counts = Counter(use.position for use in uses)
    per_row: list[GradientFactors] = [{} for _ in rows]
    for use in uses:
        if use.pairs is None or counts[use.position] != 1:
            continue  # a parameter used twice: its gradient is the sum, left to the dense path
        left, right = use.pairs(use.grad, torch.arange(len(rows), device=use.grad.device))
        for row in range(len(rows)):
            per_row[row][use.position] = (left[row].T, right[row].T)
    return per_row
