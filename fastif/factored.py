"""Scores of several s_tests from one forward and backward per candidate.

A training example's influence on test row j is -⟨∇θ L(z), s_j⟩. In the top of the
model (fastif/top.py) every influence parameter enters the example's loss through a
product whose per-example gradient factors: a Linear weight's is Σ_t δ_t x_tᵀ, with
x the layer's input and δ = ∂L/∂y the gradient at its output, so

    ⟨∇_W L(z), S_W⟩ = Σ_t δ_t · (S_W x_t)

and likewise for biases, LayerNorm scales and the folded keys and values of
fastif/first_token.py. One forward and backward of a batch of candidates gives
every factor; each (row, candidate) pair then costs one contraction, two flops per
parameter, in place of a JVP through the top, and rows that share candidates share
the forward and backward. The engine checks this against its JVPs at load and keeps
the JVPs where they disagree (a parameter that enters some other way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import Batch

Contraction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``contract(s, grad, rows)``: ⟨this use's per-example gradient, s⟩ for batch entries ``rows`` [n] -> [n].

``s`` has the parameter's shape, ``grad`` is ∂L/∂(the use's output) for the whole batch.
"""
Pairs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``pairs(grad, rows) -> (left [n, t, out], right [n, t, in])``: a matrix parameter's per-example gradient
as Σ_t left_t right_tᵀ (for a Linear weight, δ_t x_tᵀ over tokens). The Kronecker factors of
fastif/curvature/kfac.py are the covariances of the two sides.
"""


@dataclass(frozen=True)
class Use:
    """One use of a parameter in a forward: its output, how to contract its gradient, and its factor pairs.

    ``joins``: for a bias whose per-example gradient is Σ_t left_t of that weight's pairs (a
    Linear's bias; the folded value bias), the weight; the Kronecker factors then treat the
    bias as one more input column of the weight, whose input is always 1, as Kronfluence does.
    """

    param: nn.Parameter
    output: torch.Tensor
    contract: Contraction
    pairs: Pairs | None = None
    joins: nn.Parameter | None = None


class Tape:
    """The uses of parameters in one forward."""

    def __init__(self) -> None:
        self.uses: list[Use] = []

    def __call__(self, param: nn.Parameter, output: torch.Tensor, contract: Contraction, pairs: Pairs | None = None,
                 joins: nn.Parameter | None = None) -> None:
        self.uses.append(Use(param, output, contract, pairs, joins))


def _summed_over_tokens(picked: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return picked.reshape(len(picked), -1, picked.shape[-1]).sum(1) @ s


def bias_contraction(s: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A bias added along the last dimension: Σ_t δ_t · s."""
    return _summed_over_tokens(grad[rows], s)


def _record_linear(tape: Tape, module: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> None:
    x = x.detach()
    tape(module.weight, output, lambda s, grad, rows: ((x[rows] @ s.T) * grad[rows]).reshape(len(rows), -1).sum(1),
         lambda grad, rows: (grad[rows].reshape(len(rows), -1, grad.shape[-1]), x[rows].reshape(len(rows), -1, x.shape[-1])))
    if module.bias is not None:
        tape(module.bias, output, bias_contraction, joins=module.weight)


def _record_layer_norm(tape: Tape, module: nn.LayerNorm, x: torch.Tensor, output: torch.Tensor) -> None:
    normalized = F.layer_norm(x.detach(), module.normalized_shape, eps=module.eps)

    def scale(s: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _summed_over_tokens(grad[rows] * normalized[rows], s)  # Σ_t (δ_t ⊙ x̂_t) · s

    if module.weight is not None:
        tape(module.weight, output, scale)
    if module.bias is not None:
        tape(module.bias, output, bias_contraction)


def recording(tape: Tape, modules: Sequence[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that put every call of these Linear and LayerNorm modules on ``tape``."""
    handles = []
    for module in modules:
        if isinstance(module, nn.Linear):
            record = _record_linear
        elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            record = _record_layer_norm
        else:
            continue
        handles.append(module.register_forward_hook(
            lambda m, inputs, output, record=record: record(tape, m, inputs[0], output)))
    return handles


class FactoredScores:
    """⟨∇θ L(z_i), s_j⟩ for a batch of training examples z_i and many directions s_j.

    ``logits(hidden, attention_mask, tape)`` is the top of the model; ``params`` the
    influence parameters in the engine's flat order, ``modules`` those that own them.
    """

    def __init__(self, logits: Callable[..., torch.Tensor], params: Sequence[nn.Parameter], modules: Sequence[nn.Module]):
        self.logits = logits
        self.params = list(params)
        self.position = {id(p): i for i, p in enumerate(self.params)}
        self.modules = list(modules)

    def factors(self, batch: Batch, hidden: torch.Tensor) -> list[tuple[int, torch.Tensor, Contraction]]:
        """One forward and backward: (parameter position, ∂L/∂output, contraction) per use."""
        tape = Tape()
        handles = recording(tape, self.modules)
        try:
            with torch.enable_grad():
                logits = self.logits(hidden, batch.attention_mask, tape)
                uses = [(self.position[id(u.param)], u.output, u.contract) for u in tape.uses if id(u.param) in self.position]
                outputs = list({id(out): out for _, out, _ in uses}.values())
                # Summed, so each example's output gradients are those of its own loss.
                loss = F.cross_entropy(logits, batch.labels, reduction="sum")
                grads = dict(zip((id(o) for o in outputs), torch.autograd.grad(loss, outputs)))
        finally:
            for handle in handles:
                handle.remove()
        return [(position, grads[id(out)], contract) for position, out, contract in uses]

    def covers(self, uses: list[tuple[int, torch.Tensor, Contraction]]) -> bool:
        """Every influence parameter has at least one recorded use."""
        return {position for position, _, _ in uses} == set(range(len(self.params)))

    @staticmethod
    def contract(uses: list[tuple[int, torch.Tensor, Contraction]], direction: list[torch.Tensor],
                 rows: torch.Tensor) -> torch.Tensor:
        """⟨∇θ L(z_i), s⟩ of batch entries ``rows`` for one direction, given as per-parameter views."""
        with torch.no_grad():
            total = torch.zeros(len(rows), dtype=direction[0].dtype, device=direction[0].device)
            for position, grad, contract in uses:
                total += contract(direction[position], grad, rows)
        return total
