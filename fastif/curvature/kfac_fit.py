"""Fitting K-FAC's factors and EK-FAC's eigenvalues from a tape of each parameter's uses.

``fit_factors`` runs the training set through the model twice with every use of an
influence parameter recorded on a ``Tape`` (fastif/tape.py). The expectation over labels
is exact: Σ_c p_c ∇L_c ∇L_cᵀ = Jᵀ (diag p − p pᵀ) J for the logits' Jacobian J, and that
C × C matrix has rank C − 1 (ones span its null space), so C − 1 backward passes of
its scaled eigenvectors, each weighted 1 / (C − 1), give it: one pass fewer than
backpropagating each class's loss (half the work for two labels). The weights sum to 1
like the labels' probabilities, so a factor that does not depend on the gradient (a
Linear's inputs, the folded key's queries) is weighted as before. Pass 1 sums the
covariances A (inputs) and G (output gradients) of each matrix block, joining a bias to
its weight's block as a constant input column, and the exact diagonal of every other
parameter; their eigendecompositions follow. Pass 2 sums the second moments of the
per-example gradients in those eigenbases: EK-FAC's corrected eigenvalues. What the
blocks approximate and how they are applied is in fastif/curvature/kfac.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..encoding import Batch
from ..errors import CancelledError
from ..tape import Tape, Use, recording
from .kfac import KroneckerBlock, KroneckerFactors

Forward = Callable[[Batch, torch.Tensor | None, Tape], torch.Tensor]
"""``forward(batch, hidden, tape) -> logits`` with the uses of the influence parameters recorded on ``tape``."""


def _uses_by_position(tape: Tape, position: dict[int, int]) -> dict[int, list[Use]]:
    grouped: dict[int, list[Use]] = {}
    for use in tape.uses:
        if id(use.param) in position:
            grouped.setdefault(position[id(use.param)], []).append(use)
    return grouped


def _per_example_gradient(uses: list[Use], grads: dict[int, torch.Tensor], shape, rows: torch.Tensor) -> torch.Tensor:
    """[n, numel] per-example gradients of a small parameter: the Jacobian of its (linear) contractions."""
    zero = torch.zeros(shape, dtype=grads[id(uses[0].output)].dtype, device=rows.device)

    def contracted(s: torch.Tensor) -> torch.Tensor:
        return sum(use.contract(s.unsqueeze(0), grads[id(use.output)], rows)[:, 0] for use in uses)

    return torch.func.jacrev(contracted)(zero).reshape(len(rows), -1)


def _pairs(uses: list[Use], grads: dict[int, torch.Tensor], rows: torch.Tensor,
           with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The weight's (left, right) factor pairs over all its uses; ``with_bias`` appends the joined bias's input 1."""
    lefts, rights = zip(*(use.pairs(grads[id(use.output)], rows) for use in uses))
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
    if with_bias:
        right = torch.cat([right, torch.ones_like(right[..., :1])], dim=-1)
    return left, right, left.shape[1]


def _joined_biases(uses: dict[int, list[Use]], position: dict[int, int], shapes) -> dict[int, int]:
    """Weight position -> bias position, for each bias all of whose uses join one matrix weight with factor pairs."""
    joined = {}
    for pos, group in uses.items():
        weights = {id(u.joins) for u in group}
        if len(weights) != 1 or group[0].joins is None or id(group[0].joins) not in position:
            continue
        weight = position[id(group[0].joins)]
        weight_uses = uses.get(weight, [])
        if weight_uses and all(u.pairs is not None for u in weight_uses) and len(shapes[weight]) == 2:
            joined[weight] = pos
    return joined


class _Pass:
    """One forward of a batch with its uses recorded, and the backward passes that give the labels' expectation."""

    def __init__(self, forward: Forward, modules: Sequence[nn.Module], position: dict[int, int]):
        self.forward, self.modules, self.position = forward, modules, position

    def directions(self, batch: Batch, hidden: torch.Tensor | None):
        """Yields (uses by position, Jᵀ d_k per output, weight 1 / K per example) for K = max(C − 1, 1) directions with
        Σ_k d_k d_kᵀ / K = diag p − p pᵀ: the loss's Gauss-Newton matrix in the logits, from the model's probabilities p."""
        tape = Tape()
        handles = recording(tape, self.modules)
        try:
            with torch.enable_grad():
                logits = self.forward(batch, hidden, tape)
        finally:
            for handle in handles:
                handle.remove()
        uses = _uses_by_position(tape, self.position)
        outputs = list({id(u.output): u.output for group in uses.values() for u in group}.values())
        directions = _logit_directions(torch.softmax(logits.detach().double(), dim=-1))
        count = directions.shape[-1]
        directions = (directions * count**0.5).to(logits.dtype)
        weight = torch.full((len(logits),), 1 / count, dtype=logits.dtype, device=logits.device)
        for k in range(count):
            grads = torch.autograd.grad(logits, outputs, grad_outputs=directions[..., k].contiguous(),
                                        retain_graph=k < count - 1)
            yield uses, dict(zip((id(o) for o in outputs), grads)), weight


def _logit_directions(probs: torch.Tensor) -> torch.Tensor:
    """[n, C, max(C − 1, 1)]: per example, directions d_k with Σ_k d_k d_kᵀ = diag p − p pᵀ (the cross-entropy's
    Hessian in the logits, PSD with the ones vector in its null space: its smallest eigenvalue, left out)."""
    covariance = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    values, vectors = torch.linalg.eigh(covariance)
    keep = max(probs.shape[-1] - 1, 1)
    return vectors[..., -keep:] * values[..., -keep:].clamp_min(0).sqrt().unsqueeze(-2)


def _weighted_gram(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_n weight_n Σ_t x_nt x_ntᵀ for x [n, t, d]: one matrix product over every (example, token) row.

    (einsum's three-operand "nti,ntj,n->ij" contracted the first two operands first, into an
    [n, d, d] tensor: 600 MB per batch for a 1,536-wide layer.)
    """
    rows = x.reshape(-1, x.shape[-1])
    return (x * weight[:, None, None]).reshape(-1, x.shape[-1]).T @ rows


def _rotated_second_moment(left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_n weight_n (Σ_t left_nt right_ntᵀ)² (squared elementwise): EK-FAC's eigenvalues of one batch, in the
    Kronecker eigenbasis (left [n, t, a], right [n, t, b], already rotated).

    With one token per example (the first-token last block's query, output and feed-forward layers, the
    pooler, the head) each example's gradient is an outer product, and its square is the outer product of
    the squares: one [a, n] @ [n, b] product instead of an [n, a, b] tensor.
    """
    if left.shape[1] == 1:
        return (weight[:, None] * left[:, 0] ** 2).T @ right[:, 0] ** 2
    # squared in place: the [n, a, b] products are the largest tensors of the fit
    return torch.einsum("n,nab->ab", weight, torch.einsum("nta,ntb->nab", left, right).square_())


def fit_factors(
    forward: Forward,
    modules: Sequence[nn.Module],
    names: Sequence[str],
    params: Sequence[nn.Parameter],
    batches: Callable[[], Iterable[tuple[Batch, torch.Tensor | None]]],
    on_progress: Callable[[str, int, int], bool] | None = None,
    total_batches: int = 0,
) -> KroneckerFactors:
    """Fit K-FAC's factors and EK-FAC's eigenvalues over ``batches()`` (called twice: covariances, then eigenvalues)."""
    position = {id(p): i for i, p in enumerate(params)}
    shapes = [tuple(p.shape) for p in params]
    passes = _Pass(forward, modules, position)
    a_cov: dict[int, torch.Tensor] = {}
    g_cov: dict[int, torch.Tensor] = {}
    diagonal: dict[int, torch.Tensor] = {}
    kinds: dict[int, str] = {}
    bias_of: dict[int, int] | None = None  # weight position -> its joined bias, decided on the first batch
    count = 0

    def report(stage: str, done: int) -> None:
        if on_progress and on_progress(stage, done, total_batches):
            raise CancelledError(f"cancelled while fitting the curvature ({stage})")

    # Pass 1: the covariances A and G of the matrix blocks; the exact diagonal of the others.
    for number, (batch, hidden) in enumerate(batches()):
        rows = torch.arange(len(batch), device=batch.input_ids.device)
        for uses, grads, weight in passes.directions(batch, hidden):
            if bias_of is None:
                bias_of = _joined_biases(uses, position, shapes)
            joined_biases = set(bias_of.values())
            for pos, group in uses.items():
                if pos in joined_biases:
                    continue  # fitted as its weight's last input column
                kind = kinds.setdefault(pos, "kron" if all(u.pairs is not None for u in group) and len(shapes[pos]) == 2 else "diag")
                with torch.no_grad():
                    if kind == "kron":
                        left, right, tokens = _pairs(group, grads, rows, with_bias=pos in bias_of)
                        a = _weighted_gram(right, weight)
                        g = _weighted_gram(left, weight) / tokens
                        a_cov[pos] = a_cov.get(pos, 0) + a.double()
                        g_cov[pos] = g_cov.get(pos, 0) + g.double()
                    else:
                        per_example = _per_example_gradient(group, grads, shapes[pos], rows)
                        diagonal[pos] = diagonal.get(pos, 0) + (weight[:, None] * per_example**2).sum(0).double()
        count += len(batch)
        report("curvature factors", number + 1)
    if count == 0:
        raise ValueError("no training examples to fit the curvature on")

    kronecker: dict[int, KroneckerBlock] = {}
    for pos in a_cov:
        eig_a, q_a = torch.linalg.eigh(a_cov[pos] / count)
        eig_g, q_g = torch.linalg.eigh(g_cov[pos] / count)
        dtype = params[pos].dtype
        # Row-major, as a stored file loads them (eigh's are column-major): the same products, bit for bit.
        kronecker[pos] = KroneckerBlock(q_a=q_a.to(dtype).contiguous(), eig_a=eig_a.clamp_min(0).to(dtype),
                                        q_g=q_g.to(dtype).contiguous(), eig_g=eig_g.clamp_min(0).to(dtype),
                                        bias=(bias_of or {}).get(pos))

    # Pass 2: EK-FAC's eigenvalues, the second moments of the gradients in the Kronecker eigenbasis.
    corrected: dict[int, torch.Tensor] = {pos: torch.zeros(len(b.q_g), len(b.q_a), dtype=torch.float64)
                                          for pos, b in kronecker.items()}
    if kronecker:
        for number, (batch, hidden) in enumerate(batches()):
            rows = torch.arange(len(batch), device=batch.input_ids.device)
            for uses, grads, weight in passes.directions(batch, hidden):
                with torch.no_grad():
                    for pos, block in kronecker.items():
                        if pos not in uses:
                            continue
                        left, right, _ = _pairs(uses[pos], grads, rows, with_bias=block.bias is not None)
                        corrected[pos] += _rotated_second_moment(left @ block.q_g, right @ block.q_a, weight).double().cpu()
            report("curvature eigenvalues", number + 1)
    for pos, block in kronecker.items():
        block.corrected = (corrected[pos] / count).to(block.q_a.dtype)
    covered = set(kronecker) | set(diagonal) | {b.bias for b in kronecker.values() if b.bias is not None}
    return KroneckerFactors(
        names=list(names), shapes=shapes, kronecker=kronecker,
        diagonal={pos: (values / count).to(params[pos].dtype).reshape(shapes[pos]) for pos, values in diagonal.items()},
        examples=count, uncovered=[n for i, n in enumerate(names) if i not in covered],
    )
