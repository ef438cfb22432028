"""The linear datamodeling score: per test input, Spearman's ρ over subsets between the subset's sum of scores
and its retrained test loss; the LDS is their mean, reported with its standard error and the retraining's own noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .subsets import subset_sums


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank) along axis 0, as Spearman's correlation uses."""
    from scipy.stats import rankdata

    return rankdata(values, axis=0, method="average")


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Spearman's ρ between column t of ``a`` and column t of ``b`` ([m, q] each), for every t: ([q], constant).

    A column that is constant in either argument has no defined correlation: its ρ is
    reported as 0 and counted in ``constant``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [m, q] arrays of one shape, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    denominator = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    constant = denominator <= 0.0
    rho = np.where(constant, 0.0, (ra * rb).sum(axis=0) / np.where(constant, 1.0, denominator))
    return np.clip(rho, -1.0, 1.0), int(constant.sum())


@dataclass(frozen=True)
class LDSResult:
    """The linear datamodeling score of one set of scores.

    ``per_input[t]``: Spearman's ρ over subsets between Σ_{i∈S} I(z_i, z_t) and the test
    loss after retraining on S (averaged over the retraining seeds). ``mean`` and
    ``standard_error`` (sample standard deviation / √q) are over test inputs.
    ``retraining_noise``: the mean over inputs of Spearman's ρ between seed 0's and seed
    1's losses across subsets (None with a single seed): how reproducible the retraining
    itself is, so how much of an LDS of 1 is attainable at all. ``constant``: inputs
    whose sums or losses did not vary over subsets (their ρ counted as 0).
    """

    per_input: tuple[float, ...]
    mean: float
    standard_error: float
    retraining_noise: float | None
    noise_per_input: tuple[float, ...] | None
    constant: int
    num_subsets: int
    num_inputs: int

    def to_dict(self) -> dict[str, Any]:
        return {"lds": self.mean, "se": self.standard_error, "retraining_noise": self.retraining_noise,
                "constant": self.constant, "num_subsets": self.num_subsets, "num_inputs": self.num_inputs,
                "per_input": list(self.per_input)}


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return mean, se


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> LDSResult:
    """The LDS of ``scores`` [q, N] against ``losses`` [count, seeds, q] retrained on ``subsets`` [count, N].

    Per test input t: Spearman's ρ over the ``count`` subsets between
    ``subset_sums(scores, subsets)[:, t]`` and ``losses[:, :, t].mean(axis=1)``.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim == 2:
        losses = losses[:, None, :]
    sums = subset_sums(scores, subsets)
    if losses.shape[0] != sums.shape[0] or losses.shape[2] != sums.shape[1]:
        raise ValueError(f"losses {losses.shape} do not match {sums.shape[0]} subsets and {sums.shape[1]} inputs")
    per_input, constant = columnwise_spearman(sums, losses.mean(axis=1))
    mean, se = _mean_se(per_input)
    noise, noise_rows = None, None
    if losses.shape[1] >= 2:
        noise_values, _ = columnwise_spearman(losses[:, 0], losses[:, 1])
        noise, noise_rows = float(noise_values.mean()), tuple(float(v) for v in noise_values)
    return LDSResult(per_input=tuple(float(v) for v in per_input), mean=mean, standard_error=se,
                     retraining_noise=noise, noise_per_input=noise_rows, constant=constant,
                     num_subsets=int(losses.shape[0]), num_inputs=int(losses.shape[2]))
