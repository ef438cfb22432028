"""Candidates scored against the blocks of s_test that are of low rank, through their factors.

A first-token block's test gradient is one outer product, and with EK-FAC's damped inverse
eigenvalues taken at low rank (fastif/curvature/kfac.py ``inverse_factors``) its s_test is
S = L Rᵀ of rank k (k = 2-41 on MiniLM's blocks). A candidate whose per-example gradient of the
block is one outer product l rᵀ (one token, with a joined bias's constant input 1 appended
to r) scores against it as

    ⟨l rᵀ, L Rᵀ⟩ = Σ_k (l · L_k)(r · R_k)

k·(out + in) multiply-adds per (input, candidate) pair in place of out·in: these blocks' pairs
were 52 G of a 32-input job's 61 G multiply-adds with the exact inverse. The number is the
same as the dense contraction's, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .curvature.kfac import RowFactors
from .factored import Factor

CandidatePairs = dict[int, tuple[torch.Tensor, torch.Tensor]]  # weight position -> (l [n, out], r [n, in(+1)])


@dataclass(frozen=True)
class StackedRows:
    """Every row's factors of one block side by side: left [out, Σk], right [in(+1), Σk], and each column's row."""

    left: torch.Tensor
    right: torch.Tensor
    row_of_column: torch.Tensor


@dataclass(frozen=True)
class SinglePairBlocks:
    """The weights whose every candidate gradient is one outer product, as seen in a batch's ``uses``: their only
    use has one factor pair per example, and a bias that joins one has no other use."""

    positions: frozenset[int]

    @classmethod
    def seen_in(cls, uses: list[Factor]) -> SinglePairBlocks:
        """From the uses of a batch of examples that all have several tokens (a per-token use shows as such)."""
        positions = set()
        for position in {u.position for u in uses}:
            mine = [u for u in uses if u.position == position]
            if len(mine) != 1 or mine[0].pairs is None:
                continue
            left, _ = mine[0].pairs(mine[0].grad, torch.arange(1, device=mine[0].grad.device))
            biases = {u.position for u in uses if u.joins == position}
            if left.shape[1] == 1 and all([u.joins for u in uses if u.position == b] == [position] for b in biases):
                positions.add(position)
        return cls(frozenset(positions))

    def pairs(self, uses: list[Factor], joined: set[int]) -> CandidatePairs:
        """Each single-pair weight's candidate factors for the whole batch: l [n, out], r [n, in], with a constant
        input 1 appended to r where the weight is in ``joined`` (a bias joins it)."""
        out = {}
        for use in uses:
            if use.position in self.positions:
                left, right = use.pairs(use.grad, torch.arange(len(use.grad), device=use.grad.device))
                right = right[:, 0]
                if use.position in joined:
                    right = torch.cat([right, torch.ones_like(right[:, :1])], dim=1)
                out[use.position] = (left[:, 0], right)
        return out

    def covered(self, row: RowFactors) -> set[int]:
        """The positions a row's factored contraction covers: its low-rank single-pair weights and their joined biases."""
        weights = [p for p in row if p in self.positions]
        return set(weights) | {row[p].bias for p in weights if row[p].bias is not None}

    def stack(self, rows: list[RowFactors]) -> dict[int, StackedRows]:
        """Per single-pair block, the factors of the rows that have them, for ``contract_all``."""
        stacked = {}
        for position in self.positions:
            members = [(number, row[position]) for number, row in enumerate(rows) if position in row]
            if members:
                widths = torch.tensor([block.left.shape[1] for _, block in members])
                owners = torch.tensor([number for number, _ in members]).repeat_interleave(widths)
                stacked[position] = StackedRows(torch.cat([b.left for _, b in members], dim=1),
                                                torch.cat([b.right for _, b in members], dim=1),
                                                owners.to(members[0][1].left.device))
        return stacked

    @staticmethod
    def contract_all(pairs: CandidatePairs, stacked: dict[int, StackedRows], rows: int) -> torch.Tensor:
        """``contract`` for every candidate of the batch and every row at once, [n, rows]: two products per block.

        More multiply-adds than row by row where rows list different candidates, but far fewer calls: the scorer
        takes it where most (row, candidate) pairs of a batch are wanted.
        """
        total = None
        for position, stack in stacked.items():
            left, right = pairs[position]
            terms = (left.to(stack.left.dtype) @ stack.left) * (right.to(stack.right.dtype) @ stack.right)
            if total is None:
                total = terms.new_zeros(len(terms), rows)
            total.index_add_(1, stack.row_of_column, terms)
        return total

    def contract(self, pairs: CandidatePairs, row: RowFactors, rows: torch.Tensor) -> torch.Tensor | None:
        """Σ over the row's covered blocks of ⟨l rᵀ, L Rᵀ⟩ for batch entries ``rows`` (None: it covers none)."""
        total = None
        for position, block in row.items():
            if position not in self.positions:
                continue
            left, right = pairs[position]
            left, right = left[rows].to(block.left.dtype), right[rows].to(block.right.dtype)
            term = ((left @ block.left) * (right @ block.right)).sum(dim=1)
            total = term if total is None else total + term
        return total
