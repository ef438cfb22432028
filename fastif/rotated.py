"""EK-FAC's s_test left in its eigenbasis, and the candidates rotated into it instead.

For a Kronecker block (fastif/curvature/kfac.py) s_test is Q_G M Q_Aᵀ with
M = (Q_Gᵀ V Q_A) / (Λ + λ). A candidate whose per-example gradient of the block is one
outer product l rᵀ (the first-token last block's Linear layers, the pooler, the head:
one token each) scores against it as

    ⟨l rᵀ, Q_G M Q_Aᵀ⟩ = (Q_Gᵀ l)ᵀ M (Q_Aᵀ r)

so the back rotation Q_G M Q_Aᵀ, out·in·(out + in) multiply-adds per test row (2.6 G of
the 2.8 G of a MiniLM input's s_test), can be traded for rotating each candidate's two
factors, out² + in² per distinct candidate, once for every row that lists it. Rows that
share candidates (a dataset shard, a 32-input job: about 46 distinct candidates per input
at k = 1,000) pay far less; one input with its own 1,000 candidates would pay more, and
keeps the back rotation (``RotatedBlocks.worth_it``). The scores are the same numbers up
to rounding. Rows left rotated are never cached: the cache holds s_test itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .curvature.kfac import KroneckerFactors
from .factored import Factor
from .objective import InfluenceObjective


@dataclass(frozen=True)
class RotatedBlocks:
    """The Kronecker blocks whose s_test rows stay rotated: the weights at ``positions`` (with their joined biases)."""

    factors: KroneckerFactors
    positions: tuple[int, ...]

    @classmethod
    def single_pair(cls, factors: KroneckerFactors, uses: list[Factor]) -> RotatedBlocks:
        """The blocks whose every candidate gradient is one outer product, seen in ``uses`` of a batch of several tokens.

        A weight qualifies when its only use has one factor pair per example, and its joined bias (if any) has
        only the use that joins it: then the rotated pair carries the bias as its constant input 1.
        """
        positions = []
        for position, block in factors.kronecker.items():
            mine = [u for u in uses if u.position == position]
            if len(mine) != 1 or mine[0].pairs is None:
                continue
            left, _ = mine[0].pairs(mine[0].grad, torch.arange(1, device=mine[0].grad.device))
            if left.shape[1] != 1:
                continue
            if block.bias is not None and [u.joins for u in uses if u.position == block.bias] != [position]:
                continue
            positions.append(position)
        return cls(factors, tuple(positions))

    def _sizes(self, position: int) -> tuple[int, int]:
        block = self.factors.kronecker[position]
        return block.q_g.shape[0], block.q_a.shape[0]

    def worth_it(self, rows: int, candidates: int) -> bool:
        """Whether rotating ``candidates`` distinct candidates costs less than back-rotating ``rows`` rows."""
        per_candidate = sum(out * out + width * width for out, width in map(self._sizes, self.positions))
        per_row = sum(out * width * (out + width) for out, width in map(self._sizes, self.positions))
        return bool(self.positions) and candidates * per_candidate < rows * per_row

    def blocks(self, direction: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """One row's M per rotated block, [out, in(+1)], from its per-parameter views (a joined bias: the last column)."""
        out = {}
        for position in self.positions:
            bias = self.factors.kronecker[position].bias
            m = direction[position]
            out[position] = torch.cat([m, direction[bias].unsqueeze(-1)], dim=-1) if bias is not None else m
        return out

    def skipped(self) -> set[int]:
        """Positions the rotated contraction covers: the weights and their joined biases."""
        biases = {self.factors.kronecker[p].bias for p in self.positions}
        return set(self.positions) | {b for b in biases if b is not None}

    def rotate(self, uses: list[Factor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each rotated block's candidate factors for the whole batch: (Q_Gᵀ l [n, t, out], Q_Aᵀ r [n, t, in(+1)])."""
        rotated = {}
        for use in uses:
            if use.position in self.positions:
                block = self.factors.kronecker[use.position]
                left, right = use.pairs(use.grad, torch.arange(len(use.grad), device=use.grad.device))
                if block.bias is not None:
                    right = torch.cat([right, torch.ones_like(right[..., :1])], dim=-1)
                rotated[use.position] = (left.to(block.q_g.dtype) @ block.q_g, right.to(block.q_a.dtype) @ block.q_a)
        return rotated

    @staticmethod
    def contract(rotated: dict[int, tuple[torch.Tensor, torch.Tensor]], blocks: dict[int, torch.Tensor],
                 rows: torch.Tensor) -> torch.Tensor:
        """Σ over the rotated blocks of (Q_Gᵀ l)ᵀ M (Q_Aᵀ r) for batch entries ``rows``."""
        total = None
        for position, (left, right) in rotated.items():
            m = blocks[position]
            term = ((left[rows] @ m.to(left.dtype)) * right[rows]).sum(dim=(1, 2))
            total = term if total is None else total + term
        return total

    def l2_direction(self, objective: InfluenceObjective) -> torch.Tensor:
        """The L2 term's gradient direction (decay × θ) with the rotated blocks in their eigenbasis, flat [P]:
        its dot product with a rotated row is ⟨decay × θ, s_test⟩."""
        flat = (objective.decay_flat * objective.theta()).clone()
        views = objective.unflatten(flat)
        for position, matrix in self.blocks(views).items():
            block = self.factors.kronecker[position]
            turned = block.q_g.T @ matrix.to(block.q_g.dtype) @ block.q_a
            if block.bias is not None:
                views[block.bias].copy_(turned[:, -1])
                turned = turned[:, :-1]
            views[position].copy_(turned)
        return flat
