"""Sets of labelled examples encoded for an engine's model, and what the applications do with them.

An :class:`ExampleSet` is the training set itself (tokens, features, index and
cached prefix activations the engine already holds) or any other examples (an
evaluation set, a pool of never-trained candidates) encoded the same way. The
functions below evaluate, differentiate and score over a set, always through the
engine's one :class:`~fastif.objective.InfluenceObjective`, so every number is of
the same loss, over the same influence parameters, as the engine's influence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import knn
from ..data import Example, texts_of
from ..encoding import Batch, Tokenized, collate, length_batches, tokenize
from ..artefacts import search_vectors
from ..encoded import encode_set
from ..engine import InfluenceEngine
from ..knn import SearchQuery
from ..query import feature_distances
from ..prefix import PrefixStore
from ..progress import ProgressCallback


@dataclass
class ExampleSet:
    """Examples with their token ids, kNN features and keys, optional faiss index and prefix activations."""

    examples: Sequence[Example]  # the training set's are held compactly (fastif/data.py Examples)
    tokens: Tokenized
    features: np.ndarray  # [N, H] first-token features of the last block
    prefix: PrefixStore | None  # activations entering the first influence block (None: run the whole model)
    index: object | None = None  # faiss index in the engine's space (gradient keys or features)
    is_training: bool = False  # the engine's own training set: scored through the engine's fast paths

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, engine: InfluenceEngine, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        if self.is_training:  # the engine's batches: stored or recomputed prefix activations alike
            return engine.training_batch(list(indices))
        batch = collate(self.tokens, list(indices), engine.pad_id, engine.classifier.device)
        hidden = self.prefix.gather_batch(list(indices), batch) if self.prefix is not None and engine.prefix is not None else None
        return batch, hidden

    def nearest(self, query: SearchQuery, k: int | None, side: str = "both") -> tuple[np.ndarray, np.ndarray | None]:
        """The k nearest examples to ``query`` (indices, L2 feature distances); all of them when k is None or 0.

        ``side`` picks one end of a gradient-space index (fastif/knn.py's ``search``).
        """
        if not k or k >= len(self) or self.index is None:
            return np.arange(len(self)), None
        indices = knn.search(self.index, query.key, k, side)
        return indices, feature_distances(self.features, indices, query.feature)


def training_set(engine: InfluenceEngine) -> ExampleSet:
    """The engine's own training set, as prepared (features, index, prefix cache)."""
    engine.prepare()
    return ExampleSet(engine.train, engine.tokens, engine.features, engine.prefix_store, engine.index, is_training=True)


def encode_examples(
    engine: InfluenceEngine,
    examples: Sequence[Example],
    *,
    with_index: bool = False,
    batch_size: int = 64,
    on_progress: ProgressCallback | None = None,
    stage: str = "encoding",
) -> ExampleSet:
    """Encode ``examples`` like the training set, without adding them to it.

    One forward pass per length bucket gives the kNN features and keys and the frozen
    prefix's output; ``with_index`` also builds a faiss index of the engine's kind and
    space over them (a pool of candidates).
    """
    examples = list(examples)
    texts, pairs = texts_of(examples)
    tokens = tokenize(engine.classifier.tokenizer, texts, pairs, [ex.label for ex in examples], engine.spec.max_length)
    encoded = encode_set(engine.prepared, tokens, engine.pad_id, batch_size, on_progress, stage)
    vectors = search_vectors(encoded.features, encoded.gradient_keys, engine.index_config.space)
    index = knn.build_index(vectors, engine.index_config) if with_index else None
    return ExampleSet(examples, tokens, encoded.features, encoded.prefix, index)


@dataclass
class Evaluation:
    accuracy: float
    loss: float  # mean cross-entropy (no L2 term)
    predictions: np.ndarray  # [N] label ids
    losses: np.ndarray  # [N] per-example cross-entropy

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss}


@torch.no_grad()
def evaluate(engine: InfluenceEngine, data: ExampleSet, batch_size: int = 64,
             indices: Sequence[int] | None = None) -> Evaluation:
    """Accuracy, mean loss, predictions and per-example losses of the live model on ``data``."""
    chosen = list(range(len(data))) if indices is None else [int(i) for i in indices]
    predictions = np.zeros(len(chosen), dtype=np.int64)
    losses = np.zeros(len(chosen), dtype=np.float64)
    position = {i: p for p, i in enumerate(chosen)}
    for chunk in length_batches([len(data.tokens.input_ids[i]) for i in chosen], batch_size):
        members = [chosen[c] for c in chunk]
        batch, hidden = data.batch(engine, members)
        logits = engine.objective.logits(batch, hidden).float()
        values = F.cross_entropy(logits, batch.labels, reduction="none").cpu().numpy()
        guesses = logits.argmax(dim=-1).cpu().numpy()
        for member, value, guess in zip(members, values, guesses):
            losses[position[member]] = value
            predictions[position[member]] = guess
    labels = np.array([data.examples[i].label for i in chosen], dtype=np.int64)
    accuracy = float((predictions == labels).mean()) if len(chosen) else float("nan")
    return Evaluation(accuracy=accuracy, loss=float(losses.mean()) if len(chosen) else float("nan"),
                      predictions=predictions, losses=losses)


def gradient(engine: InfluenceEngine, data: ExampleSet, indices: Sequence[int]) -> torch.Tensor:
    """∇θ of the training objective's mean over ``indices`` of ``data``, flat [P]."""
    batch, hidden = data.batch(engine, indices)
    return engine.objective.gradient(batch, hidden)


def per_example_gradients(engine: InfluenceEngine, data: ExampleSet, indices: Sequence[int]) -> torch.Tensor:
    """∇θ L(z_i) of each example alone, [len(indices), P]."""
    return torch.stack([gradient(engine, data, [int(i)]) for i in indices])


def influence_scores(
    engine: InfluenceEngine,
    data: ExampleSet,
    s_test: torch.Tensor,
    indices: Sequence[int],
    batch_size: int = 64,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """I(z_i, z_t) = -⟨∇L(z_i), s_test⟩ for ``indices`` of ``data``.

    The training set goes through the engine's own scoring (per-example factors where it
    has them); any other set by batched JVPs.
    """
    if data.is_training:
        return engine.score(s_test, indices, batch_size, on_progress)
    return engine.scores_by_jvp(s_test, indices, batch_size, on_progress, tokens=data.tokens,
                                batch_of=lambda members: data.batch(engine, members))
