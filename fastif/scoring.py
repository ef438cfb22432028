"""Influence scores I(z_i, z_t) = -⟨∇θ L(z_i), s_test⟩ of training candidates, for many s_tests at once.

From per-example factors (fastif/factored.py) where the model was checked to allow
them: each candidate runs forward and backward once, however many rows list it.
Otherwise by batched JVPs (forward mode), row by row: the path for any model shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .batches import TrainingBatches
from .curvature.kfac import RowFactors
from .encoding import Batch, Tokenized, length_batches
from .errors import CancelledError
from .factored import Factor, FactoredScores
from .low_rank_scoring import SinglePairBlocks
from .objective import InfluenceObjective
from .progress import ProgressCallback


@dataclass(frozen=True)
class Placement:
    """Where one row's candidates sit in the chunks of the union of every row's candidates.

    ``order`` sorts the row's positions by chunk, ``starts[c]:starts[c + 1]`` of it are
    those in chunk c, and ``local`` is each position's place within its chunk.
    """

    order: np.ndarray
    starts: np.ndarray
    local: np.ndarray

    def in_chunk(self, number: int) -> np.ndarray:
        return self.order[self.starts[number] : self.starts[number + 1]]


def place(lists: Sequence[np.ndarray], union: np.ndarray, chunks: Sequence[Sequence[int]]) -> list[Placement]:
    """Each row's candidates (``lists``) located in ``chunks`` of ``union`` (sorted, unique)."""
    chunk_of, local_of = np.zeros(len(union), dtype=np.int64), np.zeros(len(union), dtype=np.int64)
    for number, chunk in enumerate(chunks):
        chunk_of[chunk], local_of[chunk] = number, np.arange(len(chunk))
    placements = []
    for listed in lists:
        at = np.searchsorted(union, listed)
        order = np.argsort(chunk_of[at], kind="stable")
        placements.append(Placement(order, np.searchsorted(chunk_of[at][order], np.arange(len(chunks) + 1)), local_of[at]))
    return placements


CHUNK_TOKENS = 16384
# Rows contracted together against a chunk: a folded key's product holds [rows, heads, head_size, chunk] at once.
GRID_ROWS = 64
RowGroup = tuple[set[int], list[int], list[torch.Tensor]]  # the positions skipped, the rows, their directions [R, *shape]


class Scorer:
    def __init__(self, objective: InfluenceObjective, batches: TrainingBatches, factored: FactoredScores | None):
        self.objective = objective
        self.batches = batches
        self.factored = factored if batches.with_prefix else None  # factors start from the prefix's activations
        self.device = objective.classifier.device
        self._single_pairs: SinglePairBlocks | None = None  # found on first use

    def single_pairs(self) -> SinglePairBlocks:
        """The weights whose candidate gradients are one outer product each (fastif/low_rank_scoring.py)."""
        if self._single_pairs is None:
            batch, hidden = self.batches([0])  # every example has two tokens or more: a per-token use shows as such
            self._single_pairs = SinglePairBlocks.seen_in(self.factored.factors(batch, hidden))
        return self._single_pairs

    def score_rows(self, s_tests: torch.Tensor, candidates: Sequence[Sequence[int]], batch_size: int = 64,
                   on_progress: ProgressCallback | None = None,
                   factors: Sequence[RowFactors | None] | None = None) -> list[np.ndarray]:
        """The scores of each row of ``s_tests`` [m, P] on its own training indices.

        ``factors``: each row's blocks of low rank (``Solution.factors``), whose candidates are then contracted
        through them (fastif/low_rank_scoring.py); None, or a None row: every block densely.
        """
        if self.factored is None:
            return [self.scores_by_jvp(s, c, batch_size, on_progress) for s, c in zip(s_tests, candidates)]
        s_tests = s_tests.to(self.device)
        lists = [np.asarray([int(i) for i in c], dtype=np.int64) for c in candidates]
        scores = [np.zeros(len(c), dtype=np.float64) for c in lists]
        union = np.unique(np.concatenate(lists)) if lists else np.zeros(0, dtype=np.int64)
        self.batches.will_need(union)
        lengths = self.batches.lengths(union)
        # Each chunk costs a Python call per row and parameter: chunks of up to CHUNK_TOKENS tokens, not fewer
        # examples than asked (at 66 tokens: 248 examples, where 64 took a 32-input job's scoring 1.6 s → 1.25 s).
        chunks = length_batches(lengths, max(batch_size, CHUNK_TOKENS // max(max(lengths, default=1), 1)))
        placements = place(lists, union, chunks)
        directions = [self.objective.unflatten(s) for s in s_tests]
        l2 = [self.objective.l2_derivative(s) for s in s_tests]
        rows_factors = [f or {} for f in factors] if factors is not None else [{}] * len(lists)
        single = self.single_pairs() if any(rows_factors) else SinglePairBlocks(frozenset())
        skips = [single.covered(f) for f in rows_factors]
        joined = {p for f in rows_factors for p, block in f.items() if block.bias is not None}
        stacked = single.stack(rows_factors) if single.positions else {}
        groups: list[RowGroup] | None = None  # found on first use
        total, done = sum(len(c) for c in lists), 0
        for number, chunk in enumerate(chunks):
            batch, hidden = self.batches(union[chunk].tolist())
            uses = self.factored.factors(batch, hidden)
            pairs = single.pairs(uses, joined) if single.positions else {}
            wanted = sum(len(p.in_chunk(number)) for p in placements)
            # Every row against every candidate of the chunk in a few large products, where that wastes under
            # half the work: rows that share candidates (a many-input job) share the calls too.
            grid = None
            if 2 * wanted >= len(chunk) * len(lists):
                groups = self._groups(s_tests, skips) if groups is None else groups
                grid = self._all_against_all(uses, groups, len(chunk), len(lists), s_tests.dtype)
                if stacked:
                    grid += single.contract_all(pairs, stacked, len(lists)).to(grid.dtype)
            for row, placement in enumerate(placements):
                where = placement.in_chunk(number)
                if len(where):
                    rows = torch.from_numpy(placement.local[where]).to(self.device)
                    if grid is not None:
                        derivatives = grid[rows, row]
                    else:
                        derivatives = self.factored.contract(uses, directions[row], rows, skips[row])
                        if skips[row]:
                            derivatives += single.contract(pairs, rows_factors[row], rows).to(derivatives.dtype)
                    scores[row][where] = -(derivatives.double().cpu().numpy() + l2[row])
                    done += len(where)
            if on_progress and on_progress("scoring", done, total):
                raise CancelledError("cancelled while scoring")
        return scores

    def _all_against_all(self, uses: list[Factor], groups: list[RowGroup], candidates: int, rows: int,
                         dtype: torch.dtype) -> torch.Tensor:
        """⟨∇θ L(z_i), s_j⟩ of every candidate i of the batch and every row j, but the parameters each row skips:
        [candidates, rows], one contraction per use for each group of rows."""
        every = torch.arange(candidates, device=self.device)
        grid = torch.zeros(candidates, rows, dtype=dtype, device=self.device)
        for skip, members, directions in groups:
            grid[:, members] = self.factored.contract_many(uses, directions, every, skip)
        return grid

    def _groups(self, s_tests: torch.Tensor, skips: list[set[int]]) -> list[RowGroup]:
        """The rows that skip the same parameters, up to GRID_ROWS at a time, with their directions per parameter
        stacked [R, *shape] (views of ``s_tests`` where the rows are consecutive)."""
        alike: dict[frozenset[int], list[int]] = {}
        for row, skip in enumerate(skips):
            alike.setdefault(frozenset(skip), []).append(row)
        groups = []
        for skip, rows in alike.items():
            for start in range(0, len(rows), GRID_ROWS):
                members = rows[start : start + GRID_ROWS]
                consecutive = members == list(range(members[0], members[-1] + 1))
                picked = s_tests[members[0] : members[-1] + 1] if consecutive else s_tests[members]
                directions = [chunk.view(len(members), *shape) for chunk, shape in
                              zip(torch.split(picked, self.objective.sizes, dim=1), self.objective.shapes)]
                groups.append((set(skip), members, directions))
        return groups

    def scores_by_jvp(
        self,
        s_test: torch.Tensor,
        indices: Sequence[int],
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
        tokens: Tokenized | None = None,
        batch_of: Callable[[list[int]], tuple[Batch, torch.Tensor | None]] | None = None,
    ) -> np.ndarray:
        """-⟨∇L(z_i), s_test⟩ by batched JVPs, row by row: the path for any model shape.

        ``tokens`` and ``batch_of`` name another set of examples than the training set
        (fastif/applications scores pools of candidates this way).
        """
        tokens, batch_of = (tokens, batch_of) if batch_of is not None else (self.batches.tokens, self.batches)
        indices = [int(i) for i in indices]
        if batch_of is self.batches:
            self.batches.will_need(indices)
        scores = np.zeros(len(indices), dtype=np.float64)
        done = 0
        s_test = s_test.to(self.device)
        for chunk in length_batches([len(tokens.input_ids[i]) for i in indices], batch_size):
            batch, hidden = batch_of([indices[c] for c in chunk])
            derivatives = self.objective.directional_derivatives(batch, hidden, s_test)
            scores[chunk] = -derivatives.double().cpu().numpy()  # positions: a repeated index gets each
            done += len(chunk)
            if on_progress and on_progress("scoring", done, len(indices)):
                raise CancelledError("cancelled while scoring")
        return scores
