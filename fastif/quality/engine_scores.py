"""The influence scores the LDS judges: a dense [q, N] matrix of I(z_i, z_t) from ``engine.analyze(k=None)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import ProgressCallback

if TYPE_CHECKING:
    from ..engine import InfluenceEngine
    from ..query import Query


def score_matrix(influences: Sequence[Any], num_train: int) -> np.ndarray:
    """The scores of ``Influence`` results (one per query) as a dense [q, num_train] array, by their ``indices``."""
    scores = np.zeros((len(influences), num_train), dtype=np.float64)
    for row, influence in enumerate(influences):
        indices = np.asarray(influence.indices, dtype=np.int64)
        if len(indices) != num_train:
            raise ValueError(f"query {row} scored {len(indices)} of {num_train} training examples; the LDS needs all (k=None)")
        scores[row, indices] = influence.scores
    return scores


def influence_scores(engine: InfluenceEngine, queries: Sequence[Query], solver: Any,
                     on_progress: ProgressCallback | None = None) -> np.ndarray:
    """I(z_i, z_t) for every training example i and query t, [q, N], from ``engine.analyze(k=None)``.

    ``solver`` is passed to ``engine.analyze`` unchanged (any config it accepts).
    """
    _, influences = engine.analyze(list(queries), k=None, solver=solver, on_progress=on_progress)
    return score_matrix(influences, engine.num_train)
