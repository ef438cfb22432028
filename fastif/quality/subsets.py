"""The LDS's random training subsets, and the linear datamodel's prediction for each: its sum of scores."""

from __future__ import annotations

import numpy as np


def random_subsets(num_train: int, count: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of ``range(num_train)`` as a boolean mask [count, num_train].

    Every subset holds exactly ``round(fraction * num_train)`` examples (at least 1),
    drawn uniformly without replacement and independently of the other subsets, from
    ``numpy.random.default_rng(seed)``: the same arguments give the same subsets.
    """
    if num_train < 1 or count < 1:
        raise ValueError("num_train and count must be at least 1")
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    size = max(1, int(round(fraction * num_train)))
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, num_train), dtype=bool)
    for row in range(count):
        masks[row, rng.choice(num_train, size=size, replace=False)] = True
    return masks


def subset_sums(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """Σ_{i∈S_j} scores[t, i] for every subset j and test input t: [count, q].

    ``scores`` [q, N] (one row per test input), ``subsets`` [count, N] boolean: the
    linear datamodel's prediction of each subset's test loss, up to a constant and a
    positive factor (removing z_i changes the loss by about -I_i / N).
    """
    scores = np.asarray(scores, dtype=np.float64)
    subsets = np.asarray(subsets)
    if scores.ndim != 2 or subsets.ndim != 2 or scores.shape[1] != subsets.shape[1]:
        raise ValueError(f"scores [q, N] and subsets [count, N] disagree: {scores.shape} vs {subsets.shape}")
    return subsets.astype(np.float64) @ scores.T
