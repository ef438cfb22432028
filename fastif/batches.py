"""Training examples as padded batches, with their cached prefix activations where those are kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .encoding import Batch, Tokenized, collate
from .prefix import PrefixStore


@dataclass(frozen=True)
class TrainingBatches:
    tokens: Tokenized
    pad_id: int
    device: torch.device
    prefix: PrefixStore | None  # None: the frozen layers run in every forward

    def __call__(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        """Examples ``indices`` as one batch padded to the longest, and their prefix activations (None if not cached)."""
        batch = collate(self.tokens, indices, self.pad_id, self.device)
        hidden = self.prefix.gather_batch(indices, batch) if self.prefix is not None else None
        return batch, hidden

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self, indices: Sequence[int] | None = None) -> list[int]:
        lengths = self.tokens.lengths
        return lengths if indices is None else [lengths[int(i)] for i in indices]

    def sample(self, count: int) -> list[int]:
        """A fixed sample of ``count`` indices (all of them when there are fewer), in order."""
        if count >= len(self):
            return list(range(len(self)))
        return sorted(np.random.default_rng(0).choice(len(self), size=count, replace=False).tolist())
