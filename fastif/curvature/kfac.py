"""K-FAC and EK-FAC: the Gauss-Newton matrix in per-parameter Kronecker blocks, and their damped inverse.

This module holds the fitted factors (``KroneckerFactors``: one ``KroneckerBlock`` of
eigenvectors and eigenvalues per matrix parameter, a diagonal per other parameter),
their traces and per-block means, the damped inverse applied to gradient vectors, and
their storage beside the model's other artefacts. Fitting them over the training set
is fastif/curvature/kfac_fit.py.

For a matrix parameter W [out, in] whose per-example gradient is Σ_t l_t r_tᵀ (a
Linear weight: l = δ, the gradient at its output, r = x, its input; the folded keys
and values of fastif/first_token.py: one pair per head), the Gauss-Newton block is
approximated by A ⊗ G with

    A = E_i Σ_t r_t r_tᵀ            G = E_i (1/T) Σ_t l_t l_tᵀ

taken over the training examples z_i and, for the output side, over the labels
y ~ p(y | x_i) *exactly*: with a handful of classes the expectation is a sum
weighted by the model's probabilities, so E_y[∇z L ∇z Lᵀ] = diag(p) − ppᵀ and the
result is the Gauss-Newton matrix itself, with no sampling noise. K-FAC's
eigenvalues are the products of A's and G's; EK-FAC (George et al. 2018, as in
Kronfluence) keeps their eigenvectors Q_A, Q_G and refits the eigenvalues to the
per-example gradients, Λ = E_i E_y (Q_Gᵀ ∇W L Q_A)², which is the exact diagonal of
the block in that basis. Then

    (C_W + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + wd + λ)] Q_Aᵀ

costs four small matrix products per block: a query's s_test without LiSSA. A test
gradient of a first-token block is one outer product l rᵀ (one token), so its rotation
Q_Gᵀ V Q_A is (Q_Gᵀ l)(Q_Aᵀ r)ᵀ: ``solved_rows`` finds such factors of each row by cross
approximation and rotates them instead, and rotates densely whatever is not of low rank.
With the damped inverse's eigenvalues W = 1/(Λ + λ) taken at low rank too
(``inverse_factors``: a truncated SVD, to a tolerance of W's largest entry), such a row's
answer is itself of low rank, which is cheap to form and to score candidates against
(fastif/low_rank_scoring.py): the feed-forward blocks' dense back rotation, 80 % of a MiniLM
input's s_test, and their per-(input, candidate) contraction go.

A bias whose gradient is the sum of its weight's output-side factors (a Linear's
bias, and the folded value bias) joins its weight's block as one more input column
whose input is always 1, as Kronfluence does: [W | b] is one Kronecker block, so
the bias shares the weight's eigenbasis and damping. (Fitted as diagonal blocks of
their own, the biases' few small eigenvalues, divided by a small λ, dominated the
scores: LDS 0.50 on SST-2, against 0.63 with the bias components left out.) Other
parameters (LayerNorm scales and shifts) are their own *diagonal* blocks, Λ = E_i E_y (∇θ L)², the exact
diagonal of the Gauss-Newton matrix over them. With weight decay the L2 term wd is
added to the joined bias column too (biases are not decayed): a small approximation. A parameter that no recorded use covers (a shape
fastif/tape.py does not record) is preconditioned by the mean eigenvalue of the rest, a
damped identity; ``KroneckerFactors.uncovered`` names them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FACTORS_VERSION = 2


@dataclass
class KroneckerBlock:
    q_a: torch.Tensor  # [in(+1), in(+1)] eigenvectors of A (the last input is the joined bias's constant 1)
    eig_a: torch.Tensor  # [in(+1)]
    q_g: torch.Tensor  # [out, out] eigenvectors of G
    eig_g: torch.Tensor  # [out]
    corrected: torch.Tensor | None = None  # [out, in(+1)] EK-FAC's eigenvalues in the Q_G ⊗ Q_A basis
    bias: int | None = None  # position of the bias joined as the last input column, if any

    def eigenvalues(self, kind: str) -> torch.Tensor:
        if kind == "kfac":
            return torch.outer(self.eig_g, self.eig_a).clamp_min(0.0)
        return self.corrected


# A step of cross approximation costs about 6·rows·cols flops plus Python's overhead, about 0.15 ms on one
# core (as many as 2e7 flops of a matrix product); low rank is tried while its steps cost well under a dense rotation.
_STEP_OVERHEAD_FLOPS = 2e7
_MAX_RANK = 32


def low_rank_budget(rows: int, cols: int) -> int:
    """The largest rank worth finding factors of, for a [rows, cols] matrix rotated on both sides (0: rotate densely)."""
    dense = 2.0 * rows * cols * (rows + cols)
    return min(_MAX_RANK, int(dense / (4 * (6.0 * rows * cols + _STEP_OVERHEAD_FLOPS))))


def low_rank_factors(matrix: torch.Tensor, max_rank: int, tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """U [rows, r], V [cols, r] with U Vᵀ = ``matrix`` to ``tol`` of its norm, r ≤ ``max_rank``; None past that rank.

    ``tol`` defaults to 10 roundings of the matrix's dtype: what the dense rotation's own products lose.

    Cross approximation with full pivoting: each step takes the residual's largest entry as
    pivot and removes the outer product of its row and column, which for a matrix of rank r
    leaves nothing (up to rounding) after r steps.
    """
    tol = 10 * torch.finfo(matrix.dtype).eps if tol is None else tol
    norm = float(matrix.norm())
    if norm == 0.0:
        return matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(matrix.shape[1], 0)
    residual = matrix.clone()
    lefts, rights = [], []
    for _ in range(max_rank):
        row, col = divmod(int(residual.abs().argmax()), residual.shape[1])
        left, right = residual[:, col] / residual[row, col], residual[row, :].clone()
        residual.sub_(torch.outer(left, right))
        lefts.append(left)
        rights.append(right)
        if float(residual.norm()) <= tol * norm:
            return torch.stack(lefts, dim=1), torch.stack(rights, dim=1)
    return None


# The damped inverse's eigenvalues of a big block are kept to this rank at most; past it, exactly.
_MAX_INVERSE_RANK = 64
_KEPT_INVERSES = 64  # truncated inverses a process keeps (8 dampings of MiniLM's 8 blocks), oldest dropped first


def inverse_factors(eigenvalues: torch.Tensor, shift: float, tolerance: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """U [out, r], V [in, r] with U Vᵀ = 1/(Λ + shift) to ``tolerance`` of its largest entry (1/λ), at the least
    rank r that reaches it (a truncated SVD); None where that takes a rank past the one worth having.

    1/(Λ + λ) is 1/λ wherever λ swamps the curvature and falls only where Λ is large, which EK-FAC's
    eigenvalues are in a few of their eigenvectors' directions: on MiniLM's blocks ranks 2-41 reach 1e-3.
    """
    inverse = 1.0 / (eigenvalues.double() + shift)
    limit = min(_MAX_INVERSE_RANK, inverse.numel() // (2 * sum(inverse.shape)))
    if tolerance <= 0 or limit < 1 or not bool(torch.isfinite(inverse).all()):
        return None
    u, s, vh = torch.linalg.svd(inverse, full_matrices=False)
    residual, bound = inverse.clone(), tolerance * float(inverse.max())
    for rank in range(1, limit + 1):
        residual.sub_(torch.outer(u[:, rank - 1] * s[rank - 1], vh[rank - 1]))
        if float(residual.abs().max()) <= bound:
            root = s[:rank].sqrt()
            return (u[:, :rank] * root).to(eigenvalues.dtype), (vh[:rank].T * root).to(eigenvalues.dtype)
    return None


@dataclass(frozen=True)
class LowRankBlock:
    """One row's s_test over a Kronecker block as ``left @ right.T``: the weight [out, in] and, when a bias is joined
    (``bias``: its position), the bias as the last column."""

    left: torch.Tensor  # [out, k]
    right: torch.Tensor  # [in(+1), k]
    bias: int | None


RowFactors = dict[int, LowRankBlock]  # by the weight's position: the blocks of a row that are low rank


GradientFactors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # weight position -> (L [out, t], R [in, t]): L Rᵀ


def _checked(factors: tuple[torch.Tensor, torch.Tensor] | None, matrix: torch.Tensor,
             joined: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Given factors of a row's gradient (``GradientFactors``), if they rebuild ``matrix`` (a joined bias: its
    last column, whose input is 1) to 1e-4 of its norm; else None."""
    if factors is None:
        return None
    left, right = factors[0].to(matrix.dtype), factors[1].to(matrix.dtype)
    if joined:
        right = torch.cat([right, torch.ones_like(right[:1])], dim=0)
    if right.shape[0] != matrix.shape[1] or left.shape[0] != matrix.shape[0]:
        return None
    error = float((left @ right.T - matrix).norm())
    return (left, right) if error <= 1e-4 * float(matrix.norm()) else None


def _cheapest_way(out: int, width: int, rank: int | None, inverse_rank: int | None) -> str:
    """The way to solve a row's [out, width] block in the fewest multiply-adds: "dense" (rotate it, then back),
    "rotated" (rotate its rank-t factors, back densely) or "low rank" (with W's rank-r factors too: an answer
    of rank t·r, formed from its factors). The folded keys and values (t = 12, r ≈ 25) go "rotated"."""
    costs = {"dense": 2 * out * width * (out + width)}
    if rank is not None:
        turn = rank * (out * out + width * width)
        costs["rotated"] = turn + out * width * (rank + out + width)
        if inverse_rank is not None:
            costs["low rank"] = turn + rank * inverse_rank * (out * out + width * width + out * width)
    return min(costs, key=costs.get)  # the first of equals: dense before rotated before low rank


def solved_rows(block: KroneckerBlock, vectors: torch.Tensor, inverse: torch.Tensor,
                low_rank_inverse: tuple[torch.Tensor, torch.Tensor] | None,
                given: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> tuple[torch.Tensor, list]:
    """Q_G [(Q_Gᵀ V Q_A) ⊙ W] Q_Aᵀ for each [out, in] matrix V of ``vectors`` [m, out, in], W = ``inverse``;
    and each row's factors (left, right), left @ right.T its answer, where it has them (else None).

    A row of low rank t (a first-token block's test gradient: δ xᵀ, t = 1; a folded key's: one pair
    per head) is rotated through its factors ĝ = Q_Gᵀ L, â = Q_Aᵀ R: ``given`` per row (from the
    test inputs' forward, checked here against V), else found by cross approximation. With
    W ≈ Σ_k u_k v_kᵀ (``low_rank_inverse``) its answer is then Σ_{s,k} Q_G(ĝ_s ⊙ u_k) [Q_A(â_s ⊙ v_k)]ᵀ:
    rank t·r, for t·r·(out² + in²) multiply-adds in place of out·in·(out + in), and the scorer
    (fastif/low_rank_scoring.py) contracts candidates with its factors. All of this is on CPU
    only, where it was measured: each step of cross approximation waits for its pivot, which a GPU
    would pay for in round trips, and a GPU keeps its one batched product for all rows.
    """
    on_cpu = vectors.device.type == "cpu"
    budget = low_rank_budget(*vectors.shape[1:]) if on_cpu else 0
    # Elsewhere one batched product for all rows, as before factors: a loop of small products is unmeasured there.
    given = [None] * len(vectors) if given is None or not on_cpu else given
    joined = block.bias is not None
    if budget == 0 and not any(g is not None for g in given):
        return block.q_g @ ((block.q_g.T @ vectors @ block.q_a) * inverse) @ block.q_a.T, [None] * len(vectors)
    solved, found = torch.empty_like(vectors), []
    out, width = vectors.shape[1:]
    for row, matrix in enumerate(vectors):
        factors = _checked(given[row], matrix, joined)
        if factors is None and budget:
            factors = low_rank_factors(matrix, budget)
        way = _cheapest_way(out, width, factors[0].shape[1] if factors is not None else None,
                            low_rank_inverse[0].shape[1] if low_rank_inverse is not None else None)
        if way == "dense":
            solved[row] = block.q_g @ ((block.q_g.T @ matrix @ block.q_a) * inverse) @ block.q_a.T
            found.append(None)
            continue
        g, a = block.q_g.T @ factors[0], block.q_a.T @ factors[1]  # [out, t], [in, t]
        if way == "rotated":
            solved[row] = block.q_g @ ((g @ a.T) * inverse) @ block.q_a.T
            found.append(None)
            continue
        u, v = low_rank_inverse
        left = block.q_g @ (g.unsqueeze(2) * u.unsqueeze(1)).reshape(len(g), -1)
        right = block.q_a @ (a.unsqueeze(2) * v.unsqueeze(1)).reshape(len(a), -1)
        solved[row] = left @ right.T
        found.append((left, right))
    return solved, found


# A block's products for this many bytes of rows at a time: malloc keeps temporaries of up to 32 MiB in its heap
# for the next group (fastif/allocator.py), where larger ones are mapped fresh and faulted in page by page for
# every product (about 0.6 ms per MiB on the 2-core bench machine).
_GROUP_BYTES = 16 * 2**20


def _row_groups(rows: int, bytes_per_row: int) -> list[slice]:
    step = max(1, _GROUP_BYTES // bytes_per_row)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


@dataclass
class KroneckerFactors:
    """The fitted blocks of every influence parameter, by position in the engine's flat order."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    kronecker: dict[int, KroneckerBlock]
    diagonal: dict[int, torch.Tensor]  # position -> Λ with the parameter's shape
    examples: int
    uncovered: list[str] = field(default_factory=list)
    _inverses: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # _low_rank_inverse's

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def joined(self) -> dict[int, int]:
        """Bias position -> the position of the weight whose block holds it."""
        return {b.bias: pos for pos, b in self.kronecker.items() if b.bias is not None}

    def trace(self, kind: str = "ekfac") -> float:
        """tr of the fitted curvature over the covered parameters (EK-FAC: exactly that of the block diagonal)."""
        total = sum(float(b.eigenvalues(kind).double().sum()) for b in self.kronecker.values())
        return total + sum(float(d.double().sum()) for d in self.diagonal.values())

    def mean_eigenvalue(self, kind: str = "ekfac") -> float:
        covered = self.num_params - sum(int(torch.Size(self.shapes[self.names.index(n)]).numel()) for n in self.uncovered)
        return self.trace(kind) / max(covered, 1)

    def block_means(self, kind: str = "ekfac") -> list[float]:
        """Each parameter's mean eigenvalue (its block's trace over its size); uncovered ones get the overall mean."""
        overall = self.mean_eigenvalue(kind)
        means, joined = [], self.joined
        for position, shape in enumerate(self.shapes):
            position = joined.get(position, position)
            if position in self.kronecker:
                means.append(float(self.kronecker[position].eigenvalues(kind).double().mean()))
            elif position in self.diagonal:
                means.append(float(self.diagonal[position].double().mean()))
            else:
                means.append(overall)
        return means

    def inverse_apply(self, vectors: torch.Tensor, damping: float | Sequence[float], decay: Sequence[float],
                      kind: str = "ekfac", tolerance: float = 0.0,
                      gradient_factors: Sequence[GradientFactors | None] | None = None) -> tuple[torch.Tensor, list[RowFactors]]:
        """(C + λI)⁻¹ v for each row of ``vectors`` [m, P], C the fitted curvature plus the L2 term (``decay[pos]`` = wd or 0);
        and each row's blocks that came out of low rank, as factors (``solved_rows``).

        ``damping`` is one λ, or one per parameter (``block_means`` × a ratio: Kronfluence's per-module heuristic).
        ``tolerance`` > 0: a block's damped inverse eigenvalues 1/(Λ + λ) are taken at low rank to that fraction of
        their largest (``inverse_factors``), where a rank worth having reaches it; 0: exactly.
        ``gradient_factors``: per row, factors of its blocks' gradients where known (checked before use).
        """
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        out = torch.empty_like(vectors)
        rows_factors: list[RowFactors] = [{} for _ in range(len(vectors))]
        fallback = self.mean_eigenvalue(kind)
        dampings = [float(damping)] * len(sizes) if isinstance(damping, (int, float)) else [float(d) for d in damping]
        chunks, targets = torch.split(vectors, sizes, dim=1), torch.split(out, sizes, dim=1)
        joined = self.joined
        for position, (chunk, target) in enumerate(zip(chunks, targets)):
            shift = dampings[position] + float(decay[position])
            if position in joined:
                continue  # solved with its weight's block
            if position in self.kronecker:
                block = self.kronecker[position]
                inverse = 1.0 / (block.eigenvalues(kind) + shift)
                low_rank_inverse = self._low_rank_inverse(position, kind, shift, tolerance)
                for rows in _row_groups(len(vectors), inverse.numel() * inverse.element_size()):
                    v = chunk[rows].reshape(-1, *self.shapes[position]).to(block.q_a.dtype)
                    if block.bias is not None:
                        v = torch.cat([v, chunks[block.bias][rows].to(v.dtype).unsqueeze(-1)], dim=-1)
                    given = [gradient_factors[row].get(position) if gradient_factors and gradient_factors[row] else None
                             for row in range(len(vectors))[rows]]
                    solved, found = solved_rows(block, v, inverse, low_rank_inverse, given)
                    for row, factors in zip(range(len(vectors))[rows], found):
                        if factors is not None:
                            rows_factors[row][position] = LowRankBlock(*factors, bias=block.bias)
                    if block.bias is not None:
                        targets[block.bias][rows] = solved[..., -1]
                        solved = solved[..., :-1]
                    target[rows] = solved.reshape(len(v), -1)
            elif position in self.diagonal:
                target.copy_(chunk / (self.diagonal[position].reshape(1, -1) + shift))
            else:
                target.copy_(chunk / (fallback + shift))
        return out, rows_factors

    def _low_rank_inverse(self, position: int, kind: str, shift: float,
                          tolerance: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``inverse_factors`` of a block, computed once per damping (an SVD per block: about 0.1 s for MiniLM's widest)."""
        key = (position, kind, shift, tolerance)
        if key not in self._inverses:
            if len(self._inverses) >= _KEPT_INVERSES:  # each request may name its own damping: keep the latest
                self._inverses.pop(next(iter(self._inverses)))
            self._inverses[key] = inverse_factors(self.kronecker[position].eigenvalues(kind), shift, tolerance)
        return self._inverses[key]

    # -- storage: safetensors beside the other artefacts ---------------------------------
    def save(self, path: Path) -> None:
        """Written whole beside ``path`` and renamed onto it: a reader never sees half a file, and two processes
        saving the same factors at once (the sharded build's last two parts) each rename a whole one."""
        tensors: dict[str, torch.Tensor] = {}
        for position, block in self.kronecker.items():
            name = self.names[position]
            tensors.update({f"kron.{name}.q_a": block.q_a, f"kron.{name}.eig_a": block.eig_a,
                            f"kron.{name}.q_g": block.q_g, f"kron.{name}.eig_g": block.eig_g})
            if block.corrected is not None:  # None: the bases of a fit under way (fastif/curvature/kfac_fit.py)
                tensors[f"kron.{name}.corrected"] = block.corrected
        for position, values in self.diagonal.items():
            tensors[f"diag.{self.names[position]}"] = values
        meta = {"names": self.names, "shapes": [list(s) for s in self.shapes],
                "examples": self.examples, "uncovered": self.uncovered,
                "joined": {self.names[b]: self.names[w] for b, w in self.joined.items()}}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Path) -> KroneckerFactors | None:
        """The factors at ``path``, or None when absent or written by another version."""
        loaded = load_tensors(path)
        if loaded is None:
            return None
        tensors, meta = loaded
        names = meta["names"]
        bias_of = {weight: names.index(bias) for bias, weight in meta.get("joined", {}).items()}
        kronecker, diagonal = {}, {}
        for position, name in enumerate(names):
            if f"kron.{name}.q_a" in tensors:
                kronecker[position] = KroneckerBlock(*(tensors[f"kron.{name}.{part}"] for part in ("q_a", "eig_a", "q_g", "eig_g")),
                                                     corrected=tensors.get(f"kron.{name}.corrected"), bias=bias_of.get(name))
            elif f"diag.{name}" in tensors:
                diagonal[position] = tensors[f"diag.{name}"]
        return cls(names=names, shapes=[tuple(s) for s in meta["shapes"]], kronecker=kronecker, diagonal=diagonal,
                   examples=meta["examples"], uncovered=meta["uncovered"])


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``tensors`` and ``meta`` (this module's version added) as one safetensors file, renamed onto ``path`` from a
    file of this writer's own: concurrent writers of one path each rename a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, partial,
                  metadata={"fastif": json.dumps({**meta, "version": FACTORS_VERSION})})
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """What ``save_tensors`` wrote at ``path``: None when absent (or removed meanwhile) or of another version."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["fastif"])
            if meta.get("version") != FACTORS_VERSION:
                return None
            return {key: handle.get_tensor(key) for key in handle.keys()}, meta
    except FileNotFoundError:
        return None
