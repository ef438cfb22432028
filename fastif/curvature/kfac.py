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
Q_Gᵀ V Q_A is (Q_Gᵀ l)(Q_Aᵀ r)ᵀ: ``rotated`` finds such factors of each row by cross
approximation and rotates them instead, which skips half of the dense products where
they cost most (the feed-forward blocks), and rotates densely whatever is not of low rank.

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
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def rotated_rows(block: KroneckerBlock, vectors: torch.Tensor) -> torch.Tensor:
    """Q_Gᵀ V Q_A for each [out, in] matrix of ``vectors`` [m, out, in]: through its factors where it has low rank.

    On CPU only: each step of the factorisation waits for its pivot, which a GPU would pay for in
    round trips, and the budget is measured on one CPU core.
    """
    budget = low_rank_budget(*vectors.shape[1:]) if vectors.device.type == "cpu" else 0
    if budget == 0:
        return block.q_g.T @ vectors @ block.q_a
    rotated = torch.empty_like(vectors)
    for row, matrix in enumerate(vectors):
        factors = low_rank_factors(matrix, budget)
        if factors is None:
            rotated[row] = block.q_g.T @ matrix @ block.q_a
        else:
            rotated[row] = (block.q_g.T @ factors[0]) @ (block.q_a.T @ factors[1]).T
    return rotated


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
                      kind: str = "ekfac", rotated: Collection[int] = ()) -> torch.Tensor:
        """(C + λI)⁻¹ v for each row of ``vectors`` [m, P], C the fitted curvature plus the L2 term (``decay[pos]`` = wd or 0).

        ``damping`` is one λ, or one per parameter (``block_means`` × a ratio: Kronfluence's per-module heuristic).
        The blocks of the weights at positions ``rotated`` are left in their eigenbasis: their slots (and a joined
        bias's, its last input column) hold M = (Q_Gᵀ V Q_A) / (Λ + λ), without the back rotation Q_G M Q_Aᵀ
        (fastif/rotated.py scores candidates against M).
        """
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        out = torch.empty_like(vectors)
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
                for rows in _row_groups(len(vectors), inverse.numel() * inverse.element_size()):
                    v = chunk[rows].reshape(-1, *self.shapes[position]).to(block.q_a.dtype)
                    if block.bias is not None:
                        v = torch.cat([v, chunks[block.bias][rows].to(v.dtype).unsqueeze(-1)], dim=-1)
                    solved = rotated_rows(block, v).mul_(inverse)
                    if position not in rotated:
                        solved = block.q_g @ solved @ block.q_a.T
                    if block.bias is not None:
                        targets[block.bias][rows] = solved[..., -1]
                        solved = solved[..., :-1]
                    target[rows] = solved.reshape(len(v), -1)
            elif position in self.diagonal:
                target.copy_(chunk / (self.diagonal[position].reshape(1, -1) + shift))
            else:
                target.copy_(chunk / (fallback + shift))
        return out

    # -- storage: safetensors beside the other artefacts ---------------------------------
    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for position, block in self.kronecker.items():
            name = self.names[position]
            tensors.update({f"kron.{name}.q_a": block.q_a, f"kron.{name}.eig_a": block.eig_a,
                            f"kron.{name}.q_g": block.q_g, f"kron.{name}.eig_g": block.eig_g,
                            f"kron.{name}.corrected": block.corrected})
        for position, values in self.diagonal.items():
            tensors[f"diag.{self.names[position]}"] = values
        meta = {"version": FACTORS_VERSION, "names": self.names, "shapes": [list(s) for s in self.shapes],
                "examples": self.examples, "uncovered": self.uncovered,
                "joined": {self.names[b]: self.names[w] for b, w in self.joined.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"fastif": json.dumps(meta)})
        partial.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> KroneckerFactors | None:
        """The factors at ``path``, or None when absent or written by another version."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["fastif"])
        if meta.get("version") != FACTORS_VERSION:
            return None
        tensors = load_file(str(path))
        names = meta["names"]
        bias_of = {weight: names.index(bias) for bias, weight in meta.get("joined", {}).items()}
        kronecker, diagonal = {}, {}
        for position, name in enumerate(names):
            if f"kron.{name}.q_a" in tensors:
                kronecker[position] = KroneckerBlock(*(tensors[f"kron.{name}.{part}"] for part in
                                                       ("q_a", "eig_a", "q_g", "eig_g", "corrected")),
                                                     bias=bias_of.get(name))
            elif f"diag.{name}" in tensors:
                diagonal[position] = tensors[f"diag.{name}"]
        return cls(names=names, shapes=[tuple(s) for s in meta["shapes"]], kronecker=kronecker, diagonal=diagonal,
                   examples=meta["examples"], uncovered=meta["uncovered"])
