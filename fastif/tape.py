"""What a forward records about its parameters' uses, for per-example gradient factors.

A ``Tape`` collects one ``Use`` per time an influence parameter enters a forward: its
output, how to contract its per-example gradient with a direction, and (for matrices)
its per-example gradient as factor pairs. Forward code (fastif/first_token.py,
fastif/top.py) writes to it; scoring (fastif/factored.py) and the Kronecker factors
(fastif/curvature/kfac_fit.py) read it. ``recording`` puts every Linear and LayerNorm call
of a set of modules on a tape through forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Contraction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``contract(s, grad, rows)``: ⟨this use's per-example gradient, s_r⟩ for batch entries ``rows`` [n] and
each direction s_r of ``s`` [R, *the parameter's shape] -> [n, R].

``grad`` is ∂L/∂(the use's output) for the whole batch. Many directions at once share the
candidates' side of each product: rows of a job that list the same candidates.
"""

# A Linear's contraction forms [n·t, R, out] at a time: directions go in groups that keep it this small.
_LINEAR_ELEMENTS = 2**22
Pairs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``pairs(grad, rows) -> (left [n, t, out], right [n, t, in])``: a matrix parameter's per-example gradient
as Σ_t left_t right_tᵀ (for a Linear weight, δ_t x_tᵀ over tokens). The Kronecker factors of
fastif/curvature/kfac_fit.py are the covariances of the two sides.
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
    return picked.reshape(len(picked), -1, picked.shape[-1]).sum(1) @ s.T


def bias_contraction(s: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A bias added along the last dimension: Σ_t δ_t · s_r."""
    return _summed_over_tokens(grad[rows], s)


def linear_contraction(x: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A Linear weight with input ``x``: Σ_t δ_t · (S_r x_t), as one product per group of directions."""
    inputs, grads = x[rows].reshape(-1, x.shape[-1]), grad[rows].reshape(-1, grad.shape[-1])
    directions, out = len(s), s.shape[1]
    step = max(1, _LINEAR_ELEMENTS // max(1, len(inputs) * out))
    parts = []
    for start in range(0, directions, step):
        group = s[start : start + step]
        products = (inputs @ group.reshape(-1, group.shape[-1]).T).view(len(inputs), len(group), out)
        parts.append((products * grads.unsqueeze(1)).sum(-1))
    return torch.cat(parts, dim=1).view(len(rows), -1, directions).sum(1)


def _record_linear(tape: Tape, module: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> None:
    x = x.detach()
    tape(module.weight, output, lambda s, grad, rows: linear_contraction(x, s, grad, rows),
         lambda grad, rows: (grad[rows].reshape(len(rows), -1, grad.shape[-1]), x[rows].reshape(len(rows), -1, x.shape[-1])))
    if module.bias is not None:
        tape(module.bias, output, bias_contraction, joins=module.weight)


def _record_layer_norm(tape: Tape, module: nn.LayerNorm, x: torch.Tensor, output: torch.Tensor) -> None:
    normalized = F.layer_norm(x.detach(), module.normalized_shape, eps=module.eps)

    def scale(s: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _summed_over_tokens(grad[rows] * normalized[rows], s)  # Σ_t (δ_t ⊙ x̂_t) · s_r

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
