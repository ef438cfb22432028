"""Frozen configuration objects for the engine's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA: ``h <- v + (1 - damp) h - H h / scale`` over ``depth`` sampled batches.

    The fixed point is ``(H + damp * scale * I)^-1 v``; FastIF's defaults are below.
    ``repeats`` independent runs (different sampling streams) are averaged.
    """

    damp: float = 5e-3
    scale: float = 1e4
    depth: int = 1000
    batch_size: int = 1
    repeats: int = 1
    seed: int = 0

    @property
    def damping(self) -> float:
        """The λ of ``(H + λI)`` that LiSSA converges to."""
        return self.damp * self.scale

    def __post_init__(self) -> None:
        if not (0.0 < self.damp < 1.0):
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if not (self.scale > 0.0) or self.scale != self.scale or self.scale == float("inf"):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")
        if self.depth < 1 or self.batch_size < 1 or self.repeats < 1:
            raise ValueError("depth, batch_size and repeats must be at least 1")


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradient on ``(H + damping I) x = v`` with H over the whole training set."""

    damping: float = 50.0
    tol: float = 1e-6
    max_iter: int = 500
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


@dataclass(frozen=True)
class DataSpec:
    """Where the examples are and which fields hold text, pair text and label."""

    path: str
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] = "auto"
    quoting: Literal["minimal", "none"] = "minimal"


@dataclass(frozen=True)
class IndexConfig:
    """The faiss index that picks the candidates: exact Flat, or IVF / HNSW for large N.

    ``space``: ``gradient`` searches the output layer's per-example loss gradients by
    inner product (either sign); ``feature`` is FastIF's L2 search of first-token
    features (see fastif/knn.py).
    """

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    space: Literal["gradient", "feature"] = "gradient"
    nlist: int | None = None  # IVF cells; default ~ 4 * sqrt(N)
    nprobe: int = 16
    hnsw_m: int = 32


@dataclass(frozen=True)
class InfluenceSpec:
    """Which parameters count and how the training objective is regularised."""

    params: str | tuple[str, ...] = "auto"
    weight_decay: float = 0.0
    max_length: int = 128
    weight_decay_ignores: tuple[str, ...] = field(default=("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight"))
