"""Fitting K-FAC's factors and EK-FAC's eigenvalues from a tape of each parameter's uses.

``FactorFit`` runs a sample of the training set through the model twice with every use of an
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
per-example gradients in those eigenbases: EK-FAC's corrected eigenvalues, in
``EIGENVALUE_PARTS`` parts that processes may share (each part's sums are saved, and added
in part order). What the blocks approximate and how they are applied is in
fastif/curvature/kfac.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

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


EIGENVALUE_PARTS = 4
"""Pass 2 runs in this many parts, part p over batches p, p + 4, p + 8, ..., which processes may share (the sharded
build: workers/build.py).

A constant, not the number of workers: the parts' sums are added in part order, so the factors come out the same
bit for bit whoever fitted which part. Four parts let two workers share the pass evenly after one of them
fitted the bases while the other estimated the spectrum."""


class FactorFit:
    """EK-FAC's fit over a fixed list of batches, in steps that may run in different processes.

    ``bases`` (pass 1: the covariances, their eigendecompositions and the diagonal blocks), then
    ``eigenvalue_part`` for each of ``EIGENVALUE_PARTS`` shares of the batches (pass 2, given the bases),
    then ``combined_factors``. One process that runs them all (fastif/curvature/training.py) takes the same sums
    in the same order.
    """

    def __init__(self, forward: Forward, modules: Sequence[nn.Module], names: Sequence[str], params: Sequence[nn.Parameter],
                 batch: Callable[[int], tuple[Batch, torch.Tensor | None]], num_batches: int):
        """``batch(i)``: the i-th of ``num_batches`` batches, with its prefix activations (or None)."""
        self.names, self.params = list(names), params
        self.position = {id(p): i for i, p in enumerate(params)}
        self.shapes = [tuple(p.shape) for p in params]
        self.passes = _Pass(forward, modules, self.position)
        self.batch, self.num_batches = batch, num_batches

    def bases(self, on_progress: Callable[[str, int, int], bool] | None = None) -> KroneckerFactors:
        """Pass 1: K-FAC's eigenbases of every matrix block (EK-FAC's eigenvalues not yet fitted: ``corrected`` None)
        and the exact diagonal of every other parameter."""
        a_cov: dict[int, torch.Tensor] = {}
        g_cov: dict[int, torch.Tensor] = {}
        diagonal: dict[int, torch.Tensor] = {}
        kinds: dict[int, str] = {}
        bias_of: dict[int, int] | None = None  # weight position -> its joined bias, decided on the first batch
        count = 0
        for number in range(self.num_batches):
            batch, hidden = self.batch(number)
            rows = torch.arange(len(batch), device=batch.input_ids.device)
            for uses, grads, weight in self.passes.directions(batch, hidden):
                if bias_of is None:
                    bias_of = _joined_biases(uses, self.position, self.shapes)
                joined_biases = set(bias_of.values())
                for pos, group in uses.items():
                    if pos in joined_biases:
                        continue  # fitted as its weight's last input column
                    kind = kinds.setdefault(pos, "kron" if all(u.pairs is not None for u in group)
                                            and len(self.shapes[pos]) == 2 else "diag")
                    with torch.no_grad():
                        if kind == "kron":
                            left, right, tokens = _pairs(group, grads, rows, with_bias=pos in bias_of)
                            a = _weighted_gram(right, weight)
                            g = _weighted_gram(left, weight) / tokens
                            a_cov[pos] = a_cov.get(pos, 0) + a.double()
                            g_cov[pos] = g_cov.get(pos, 0) + g.double()
                        else:
                            per_example = _per_example_gradient(group, grads, self.shapes[pos], rows)
                            diagonal[pos] = diagonal.get(pos, 0) + (weight[:, None] * per_example**2).sum(0).double()
            count += len(batch)
            _report(on_progress, "curvature factors", number + 1, self.num_batches)
        if count == 0:
            raise ValueError("no training examples to fit the curvature on")

        kronecker: dict[int, KroneckerBlock] = {}
        for pos in a_cov:
            eig_a, q_a = torch.linalg.eigh(a_cov[pos] / count)
            eig_g, q_g = torch.linalg.eigh(g_cov[pos] / count)
            dtype = self.params[pos].dtype
            # Row-major, as a stored file loads them (eigh's are column-major): the same products, bit for bit.
            kronecker[pos] = KroneckerBlock(q_a=q_a.to(dtype).contiguous(), eig_a=eig_a.clamp_min(0).to(dtype),
                                            q_g=q_g.to(dtype).contiguous(), eig_g=eig_g.clamp_min(0).to(dtype),
                                            bias=(bias_of or {}).get(pos))
        covered = set(kronecker) | set(diagonal) | {b.bias for b in kronecker.values() if b.bias is not None}
        return KroneckerFactors(
            names=self.names, shapes=self.shapes, kronecker=kronecker,
            diagonal={pos: (values / count).to(self.params[pos].dtype).reshape(self.shapes[pos])
                      for pos, values in diagonal.items()},
            examples=count, uncovered=[n for i, n in enumerate(self.names) if i not in covered],
        )

    def part_batches(self, part: int) -> range:
        """The batches of pass 2's part ``part``: every ``EIGENVALUE_PARTS``-th, so that the parts cost alike
        (the batches are ordered by length)."""
        if not 0 <= part < EIGENVALUE_PARTS:
            raise ValueError(f"no eigenvalue part {part}: there are {EIGENVALUE_PARTS}")
        return range(part, self.num_batches, EIGENVALUE_PARTS)

    def eigenvalue_part(self, bases: KroneckerFactors, part: int,
                        on_progress: Callable[[str, int, int], bool] | None = None) -> dict[int, torch.Tensor]:
        """Pass 2 over part ``part`` of the batches: the sums (float64, not yet divided by the examples) of the
        per-example gradients' second moments in each block's eigenbasis, by the block's position."""
        numbers = self.part_batches(part)
        sums = {pos: torch.zeros(len(b.q_g), len(b.q_a), dtype=torch.float64) for pos, b in bases.kronecker.items()}
        if not bases.kronecker:
            return sums
        for done, number in enumerate(numbers, start=1):
            batch, hidden = self.batch(number)
            rows = torch.arange(len(batch), device=batch.input_ids.device)
            for uses, grads, weight in self.passes.directions(batch, hidden):
                with torch.no_grad():
                    for pos, block in bases.kronecker.items():
                        if pos not in uses:
                            continue
                        left, right, _ = _pairs(uses[pos], grads, rows, with_bias=block.bias is not None)
                        sums[pos] += _rotated_second_moment(left @ block.q_g, right @ block.q_a, weight).double().cpu()
            _report(on_progress, "curvature eigenvalues", done, len(numbers))
        return sums


def combined_factors(bases: KroneckerFactors, parts: Sequence[dict[int, torch.Tensor]]) -> KroneckerFactors:
    """The factors: ``bases`` with EK-FAC's eigenvalues, the ``parts``' sums (in part order) over the examples."""
    blocks = {}
    for pos, block in bases.kronecker.items():
        total = parts[0][pos].clone()
        for part in parts[1:]:
            total += part[pos]
        blocks[pos] = replace(block, corrected=(total / bases.examples).to(block.q_a.dtype))
    return replace(bases, kronecker=blocks)


def _report(on_progress: Callable[[str, int, int], bool] | None, stage: str, done: int, total: int) -> None:
    if on_progress and on_progress(stage, done, total):
        raise CancelledError(f"cancelled while fitting the curvature ({stage})")
