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
from .curvature.kfac import KroneckerFactors
from .encoding import Batch, Tokenized, length_batches
from .errors import CancelledError
from .factored import FactoredScores
from .objective import InfluenceObjective
from .progress import ProgressCallback
from .rotated import RotatedBlocks


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


class Scorer:
    def __init__(self, objective: InfluenceObjective, batches: TrainingBatches, factored: FactoredScores | None):
        self.objective = objective
        self.batches = batches
        self.factored = factored if batches.with_prefix else None  # factors start from the prefix's activations
        self.device = objective.classifier.device
        self._rotatable: RotatedBlocks | None = None  # found once per set of factors

    def rotatable(self, factors: KroneckerFactors) -> RotatedBlocks | None:
        """The blocks whose rows may stay in EK-FAC's eigenbasis when scored here (None: the JVP path scores)."""
        if self.factored is None:
            return None
        if self._rotatable is None or self._rotatable.factors is not factors:
            batch, hidden = self.batches([0])  # every example has two tokens or more: a per-token use shows as such
            self._rotatable = RotatedBlocks.single_pair(factors, self.factored.factors(batch, hidden))
        return self._rotatable

    def score_rows(self, s_tests: torch.Tensor, candidates: Sequence[Sequence[int]], batch_size: int = 64,
                   on_progress: ProgressCallback | None = None, rotated: RotatedBlocks | None = None) -> list[np.ndarray]:
        """The scores of each row of ``s_tests`` [m, P] on its own training indices.

        ``rotated``: the rows hold these blocks in EK-FAC's eigenbasis (fastif/rotated.py), and the candidates are
        rotated to meet them.
        """
        if self.factored is None:
            if rotated is not None:
                raise ValueError("rows left in the eigenbasis are scored from per-example factors only")
            return [self.scores_by_jvp(s, c, batch_size, on_progress) for s, c in zip(s_tests, candidates)]
        s_tests = s_tests.to(self.device)
        lists = [np.asarray([int(i) for i in c], dtype=np.int64) for c in candidates]
        scores = [np.zeros(len(c), dtype=np.float64) for c in lists]
        union = np.unique(np.concatenate(lists)) if lists else np.zeros(0, dtype=np.int64)
        chunks = length_batches(self.batches.lengths(union), batch_size)
        placements = place(lists, union, chunks)
        directions = [self.objective.unflatten(s) for s in s_tests]
        if rotated is None:
            l2 = [self.objective.l2_derivative(s) for s in s_tests]
            skip, blocks = set(), []
        else:
            l2_direction = rotated.l2_direction(self.objective) if self.objective.weight_decay else None
            l2 = [self.objective.weight_decay * float(l2_direction @ s) if l2_direction is not None else 0.0
                  for s in s_tests]
            skip, blocks = rotated.skipped(), [rotated.blocks(d) for d in directions]
        total, done = sum(len(c) for c in lists), 0
        for number, chunk in enumerate(chunks):
            batch, hidden = self.batches(union[chunk].tolist())
            uses = self.factored.factors(batch, hidden)
            turned = rotated.rotate(uses) if rotated is not None else None
            for row, placement in enumerate(placements):
                where = placement.in_chunk(number)
                if len(where):
                    rows = torch.from_numpy(placement.local[where]).to(self.device)
                    derivatives = self.factored.contract(uses, directions[row], rows, skip)
                    if turned is not None:
                        derivatives += RotatedBlocks.contract(turned, blocks[row], rows).to(derivatives.dtype)
                    scores[row][where] = -(derivatives.double().cpu().numpy() + l2[row])
                    done += len(where)
            if on_progress and on_progress("scoring", done, total):
                raise CancelledError("cancelled while scoring")
        return scores

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
