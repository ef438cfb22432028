"""Frozen configuration objects for the engine's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA: ``h <- v + (1 - damp) h - C h / scale`` over ``depth`` sampled batches.

    The fixed point is ``(C + damp * scale * I)^-1 v``. FastIF's published values are
    ``damp=5e-3, scale=1e4`` (λ = 50); ``FASTIF_PAPER`` below is that configuration.
    ``repeats`` independent runs (different sampling streams) are averaged. Inside a
    ``SolverConfig`` whose ``damping`` is relative, damp and scale are derived from the
    curvature's spectrum instead (fastif/curvature/damping.py).
    """

    damp: float = 5e-3
    scale: float = 1e4
    depth: int = 1000
    batch_size: int = 1
    repeats: int = 1
    seed: int = 0

    @property
    def damping(self) -> float:
        """The λ of ``(C + λI)`` that LiSSA converges to."""
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
    """Conjugate gradient on ``(C + damping I) x = v`` with C over the whole training set (or ``sample`` of it)."""

    damping: float = 50.0
    tol: float = 1e-6
    max_iter: int = 500
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


Curvature = Literal["gauss-newton", "hessian"]
DampingScope = Literal["curvature", "block"]
DAMPING_SCOPES: tuple[str, ...] = ("curvature", "block")
# Measured by `fastif bench lds` (bench/results/lds.md, SST-2, MiniLM, N = 2,000): EK-FAC with λ per block at
# 10 × the block's mean eigenvalue gave LDS 0.64 (0.59 at 0.1, 0.65 at 30, within a standard error); relative to
# the whole curvature, 0.1 × its mean eigenvalue is Kronfluence's heuristic, and there the ratio mattered little.
DEFAULT_DAMPING_RATIO: dict[str, float] = {"block": 10.0, "curvature": 0.1}
DEFAULT_INVERSE_RANK_TOLERANCE = 1e-3  # SolverConfig.inverse_rank_tolerance
SolverName = Literal["lissa", "cg", "ekfac", "kfac", "identity"]
SOLVERS: tuple[str, ...] = ("lissa", "cg", "ekfac", "kfac", "identity")
CURVATURES: tuple[str, ...] = ("gauss-newton", "hessian")


@dataclass(frozen=True)
class SolverConfig:
    """How s_test = (C + λI)⁻¹ ∇L(z_t) is computed: which solver, which curvature C, which λ.

    ``damping`` None means λ = ``damping_ratio`` × the curvature's mean eigenvalue
    (its trace over the number of influence parameters, estimated once per model);
    with ``damping_scope`` "block" (EK-FAC and K-FAC only) each parameter's block gets
    ratio × its own mean eigenvalue instead, Kronfluence's heuristic. A number is an absolute λ. For LiSSA, ``lissa.damp`` and
    ``lissa.scale`` are then derived too: scale above the largest eigenvalue, so that
    the recursion cannot diverge, and damp = λ / scale. An absolute ``damping`` with
    ``lissa_absolute`` keeps the LiSSA knobs exactly as given (FastIF's published
    configuration: ``FASTIF_PAPER``). ``identity`` ignores C: s_test = ∇L(z_t) / λ
    ranks like a plain gradient dot product.
    """

    solver: SolverName = "ekfac"
    curvature: Curvature = "gauss-newton"
    damping: float | None = None
    damping_ratio: float | None = None  # None: the scope's default, DEFAULT_DAMPING_RATIO
    damping_scope: DampingScope | None = None  # None: "block" for ekfac and kfac, "curvature" for the others
    lissa: LissaConfig = field(default_factory=LissaConfig)
    lissa_absolute: bool = False  # LiSSA's damp and scale exactly as given in ``lissa``
    cg_tol: float = 1e-5
    cg_max_iter: int = 200
    # EK-FAC and K-FAC: each block's damped inverse eigenvalues 1/(Λ + λ) at the least rank that matches them to this
    # fraction of their largest (fastif/curvature/kfac.py ``inverse_factors``); 0: exactly. At 1e-3 the scores on
    # `fastif bench batch`'s model match the exact ones to 8e-5 of their spread, for a fraction of the work.
    inverse_rank_tolerance: float = DEFAULT_INVERSE_RANK_TOLERANCE

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        # Defaults resolved here, so that a config (and its cache key) always holds the values it runs with.
        if self.damping_scope is None:
            object.__setattr__(self, "damping_scope", "block" if self.solver in ("ekfac", "kfac") else "curvature")
        if self.damping_ratio is None:
            object.__setattr__(self, "damping_ratio", DEFAULT_DAMPING_RATIO[self.damping_scope])
        if self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; choose one of {', '.join(CURVATURES)}")
        if self.damping is not None and not (self.damping >= 0.0 and self.damping != float("inf")):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if not (self.damping_ratio > 0.0 and self.damping_ratio != float("inf")):
            raise ValueError(f"damping_ratio must be a positive finite number, got {self.damping_ratio}")
        if self.damping_scope not in DAMPING_SCOPES:
            raise ValueError(f"unknown damping_scope {self.damping_scope!r}; choose one of {', '.join(DAMPING_SCOPES)}")
        if self.damping_scope == "block" and self.solver not in ("ekfac", "kfac"):
            raise ValueError("damping_scope 'block' needs the blocks of solver ekfac or kfac")
        if self.lissa_absolute and self.damping is not None and abs(self.damping - self.lissa.damping) > 1e-12 * self.damping:
            raise ValueError("with lissa_absolute, damping is lissa.damp * lissa.scale; give one or the other")
        if not 0.0 <= self.inverse_rank_tolerance < 1.0:
            raise ValueError(f"inverse_rank_tolerance must be in [0, 1), got {self.inverse_rank_tolerance}")
        if self.cg_tol <= 0 or self.cg_max_iter < 1:
            raise ValueError("cg_tol must be > 0 and cg_max_iter >= 1")

    @classmethod
    def fastif_paper(cls, depth: int = 1000, batch_size: int = 1, repeats: int = 1, seed: int = 0) -> SolverConfig:
        """FastIF's published configuration: LiSSA on the Hessian, damp 5e-3, scale 1e4 (λ = 50)."""
        lissa = LissaConfig(damp=5e-3, scale=1e4, depth=depth, batch_size=batch_size, repeats=repeats, seed=seed)
        return cls(solver="lissa", curvature="hessian", damping=lissa.damping, lissa=lissa, lissa_absolute=True)

    def cache_identity(self) -> dict:
        """Every field that changes s_test, as plain values (the s_test cache key)."""
        identity = {"solver": self.solver, "curvature": self.curvature, "damping": self.damping,
                    "damping_ratio": self.damping_ratio if self.damping is None else None,
                    "damping_scope": self.damping_scope if self.damping is None else None}
        if self.solver == "lissa":
            identity["lissa"] = {**self.lissa.__dict__, "absolute": self.lissa_absolute}
            if not self.lissa_absolute:
                identity["lissa"].pop("damp"), identity["lissa"].pop("scale")
        if self.solver == "cg":
            identity["cg"] = {"tol": self.cg_tol, "max_iter": self.cg_max_iter}
        if self.solver in ("ekfac", "kfac"):
            identity["inverse_rank_tolerance"] = self.inverse_rank_tolerance
        return identity


@dataclass(frozen=True)
class DataSpec:
    """Where the examples are and which fields hold text, pair text and label."""

    path: str
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] = "auto"
    quoting: Literal["minimal", "none"] = "minimal"


INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw")
INDEX_SPACES: tuple[str, ...] = ("gradient", "feature")


@dataclass(frozen=True)
class IndexConfig:
    """The faiss index that picks the candidates: exact Flat, or IVF / HNSW for large N.

    ``kind``: ``auto`` (the default) is exact Flat up to fastif.knn.AUTO_FLAT_MAX_EXAMPLES
    training examples and IVF above, its ``nprobe`` chosen at build time so that the
    measured recall@1000 of the Flat index's neighbours is at least ``recall_target``;
    ``ivf`` searches ``nprobe`` cells as given. ``space``: ``gradient`` searches the output
    layer's per-example loss gradients by inner product (either sign); ``feature`` is
    FastIF's L2 search of first-token features (see fastif/knn.py).
    """

    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    space: Literal["gradient", "feature"] = "gradient"
    nlist: int | None = None  # IVF cells; default ~ 4 * sqrt(N)
    nprobe: int = 16  # IVF cells searched per query (``ivf``; ``auto`` chooses its own)
    hnsw_m: int = 32
    recall_target: float = 0.95  # the recall@1000 ``auto`` chooses nprobe for
    # The frozen prefix's activations: kept on disk ("cached", in ``prefix_dtype``; float16 and bfloat16
    # halve the bytes), or computed again for the few examples a query touches ("recompute": no storage).
    prefix: Literal["cached", "recompute"] = "cached"
    prefix_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # The build writes the training set in shards of this many examples (fastif/staged_build.py), which any
    # process may take; each shard's batches are its own, so its numbers do not depend on who computed it.
    shard_examples: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        if self.space not in INDEX_SPACES:
            raise ValueError(f"unknown index space {self.space!r}; choose one of {', '.join(INDEX_SPACES)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be at least 1 (or None for the default), got {self.nlist}")
        if self.nprobe < 1 or self.hnsw_m < 2:
            raise ValueError(f"nprobe must be at least 1 and hnsw_m at least 2, got {self.nprobe} and {self.hnsw_m}")
        if self.shard_examples < 1:
            raise ValueError(f"shard_examples must be at least 1, got {self.shard_examples}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")


@dataclass(frozen=True)
class InfluenceSpec:
    """Which parameters count and how the training objective is regularised."""

    params: str | tuple[str, ...] = "auto"
    weight_decay: float = 0.0
    max_length: int = 128
    weight_decay_ignores: tuple[str, ...] = field(default=("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight"))
