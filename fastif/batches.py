"""Training examples as padded batches, with their cached prefix activations where those are kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .encoding import Batch, Tokenized, collate
from .prefix import PrefixStore


@dataclass(frozen=True)
class TrainingBatches:
    """``prefix``: the stored activations; else ``recompute(batch)`` runs the frozen layers for just this batch;
    with neither, every forward runs the whole model."""

    tokens: Tokenized
    pad_id: int
    device: torch.device
    prefix: PrefixStore | None
    recompute: Callable[[Batch], torch.Tensor] | None = None

    def __call__(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        """Examples ``indices`` as one batch padded to the longest, and their prefix activations (None: none)."""
        batch = collate(self.tokens, indices, self.pad_id, self.device)
        if self.prefix is not None:
            return batch, self.prefix.gather_batch(indices, batch)
        return batch, self.recompute(batch) if self.recompute is not None else None

    def will_need(self, indices: Sequence[int]) -> None:
        """The stored activations of ``indices`` asked of the disk at once, ahead of the batches that read them."""
        if self.prefix is not None:
            self.prefix.will_need(indices)

    @property
    def with_prefix(self) -> bool:
        """Whether batches come with the frozen prefix's activations (the fast paths start from them)."""
        return self.prefix is not None or self.recompute is not None

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self, indices: Sequence[int] | None = None) -> list[int]:
        """Token counts of every example (or of ``indices``), read from the ids' offsets."""
        lengths = self.tokens.input_ids.lengths
        return (lengths if indices is None else lengths[np.asarray(indices, dtype=np.int64)]).tolist()

    def sample(self, count: int) -> list[int]:
        """A fixed sample of ``count`` indices (all of them when there are fewer), in order."""
        if count >= len(self):
            return list(range(len(self)))
        return sorted(np.random.default_rng(0).choice(len(self), size=count, replace=False).tolist())
