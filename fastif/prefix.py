"""Skip the frozen bottom of the network by replaying its cached output.

The activations entering the first influence block never change, so they are
computed once per training example and stored. During gradient, HVP and JVP
passes the frozen blocks are bypassed: each returns the cached activations, and
the model's own forward still builds the masks, runs the influence blocks and the
head. This keeps every model family's head and mask logic as the library wrote
it, with no per-family code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoding import Batch


def _hidden_of(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # DeBERTa blocks return (hidden, attn)


class FrozenPrefix:
    """Bypass blocks ``0 .. first-1`` of ``layers`` while activations are injected."""

    def __init__(self, layers: nn.ModuleList, first: int):
        if first < 1:
            raise ValueError("nothing to bypass: the first influence block is block 0")
        self.layers = layers
        self.first = first
        self._injected: torch.Tensor | None = None
        self._returns_tuple = False
        for block in list(layers)[:first]:
            block.forward = self._bypass(block.forward)

    def _bypass(self, original):
        def forward(*args, **kwargs):
            if self._injected is None:
                return original(*args, **kwargs)
            return (self._injected, None) if self._returns_tuple else self._injected

        return forward

    @contextmanager
    def injected(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within this block, the frozen blocks output ``hidden`` instead of computing."""
        self._injected = hidden
        try:
            yield
        finally:
            self._injected = None

    @contextmanager
    def capturing(self, sink: list[torch.Tensor]) -> Iterator[None]:
        """Record what the last frozen block outputs during a normal forward."""

        def hook(_module, _args, output):
            self._returns_tuple = isinstance(output, tuple)
            sink.append(_hidden_of(output).detach())

        handle = self.layers[self.first - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class PrefixStore:
    """Cached activations of every example, ragged: rows ``offsets[i]:offsets[i+1]`` of ``flat``."""

    flat: np.ndarray  # float32 [total_tokens, hidden]; a memory map when loaded from disk
    offsets: np.ndarray  # int64 [N + 1]

    def gather(self, indices: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
        """Activations of ``indices`` zero-padded to ``width`` tokens: [len(indices), width, hidden]."""
        out = torch.zeros((len(indices), width, self.flat.shape[1]), dtype=torch.float32)
        for row, i in enumerate(indices):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            out[row, : end - start] = torch.from_numpy(np.array(self.flat[start:end], dtype=np.float32))
        return out.to(device)

    def gather_batch(self, indices: Sequence[int], batch: Batch) -> torch.Tensor:
        return self.gather(indices, batch.input_ids.shape[1], batch.input_ids.device)

    def save(self, folder: Path) -> None:
        np.save(folder / "prefix_offsets.npy", self.offsets)
        np.save(folder / "prefix.npy", self.flat)

    @classmethod
    def load(cls, folder: Path) -> PrefixStore:
        return cls(flat=np.load(folder / "prefix.npy", mmap_mode="r"), offsets=np.load(folder / "prefix_offsets.npy"))

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> PrefixStore:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(flat=np.concatenate(rows).astype(np.float32), offsets=offsets)


def write_meta(folder: Path, meta: dict) -> None:
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
