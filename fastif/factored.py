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

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import Batch
from .tape import Contraction, Pairs, Tape, recording


@dataclass(frozen=True)
class Factor:
    """One use of an influence parameter in a batch's forward: ∂L/∂(its output) for the batch, how to contract
    its per-example gradient with a direction, its factor pairs (matrices) and the weight a bias joins."""

    position: int
    grad: torch.Tensor
    contract: Contraction
    pairs: Pairs | None = None
    joins: int | None = None  # the position of the weight this bias joins (fastif/curvature/kfac.py)


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

    def factors(self, batch: Batch, hidden: torch.Tensor) -> list[Factor]:
        """One forward and backward: a ``Factor`` per use of an influence parameter."""
        tape = Tape()
        handles = recording(tape, self.modules)
        try:
            with torch.enable_grad():
                logits = self.logits(hidden, batch.attention_mask, tape)
                uses = [u for u in tape.uses if id(u.param) in self.position]
                outputs = list({id(u.output): u.output for u in uses}.values())
                # Summed, so each example's output gradients are those of its own loss.
                loss = F.cross_entropy(logits, batch.labels, reduction="sum")
                grads = dict(zip((id(o) for o in outputs), torch.autograd.grad(loss, outputs)))
        finally:
            for handle in handles:
                handle.remove()
        return [Factor(self.position[id(u.param)], grads[id(u.output)], u.contract, u.pairs,
                       self.position.get(id(u.joins)) if u.joins is not None else None) for u in uses]

    def covers(self, uses: list[Factor]) -> bool:
        """Every influence parameter has at least one recorded use."""
        return {use.position for use in uses} == set(range(len(self.params)))

    @staticmethod
    def contract(uses: list[Factor], direction: list[torch.Tensor], rows: torch.Tensor,
                 skip: Collection[int] = ()) -> torch.Tensor:
        """⟨∇θ L(z_i), s⟩ of batch entries ``rows`` for one direction, given as per-parameter views (but the
        parameters at positions ``skip``)."""
        return FactoredScores.contract_many(uses, [d.unsqueeze(0) for d in direction], rows, skip)[:, 0]

    @staticmethod
    def contract_many(uses: list[Factor], directions: list[torch.Tensor], rows: torch.Tensor,
                      skip: Collection[int] = ()) -> torch.Tensor:
        """``contract`` for R directions at once, each parameter's given stacked [R, *shape]: [len(rows), R]."""
        with torch.no_grad():
            total = torch.zeros(len(rows), len(directions[0]), dtype=directions[0].dtype, device=directions[0].device)
            for use in uses:
                if use.position not in skip:
                    total += use.contract(directions[use.position], use.grad, rows)
        return total
