"""Skip the frozen bottom of the network by replaying its output.

The activations entering the first influence block never change, so they are
computed once per training example and stored (``PrefixStore``, in float32 or at
half the bytes), or computed again for just the batch at hand (``prefix:
"recompute"``, fastif/batches.py). During gradient, HVP and JVP
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
from .errors import DataError
from .readahead import will_need


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


PREFIX_DTYPES = ("float32", "float16", "bfloat16")
# numpy has no bfloat16: its values are kept as their 16 raw bits and reinterpreted by torch.
_STORED_AS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prefix_file(dtype: str) -> str:
    """The file of the flat activations in ``dtype`` (float32 keeps the name it always had)."""
    return "prefix.npy" if dtype == "float32" else f"prefix-{dtype}.npy"


@dataclass
class PrefixStore:
    """Cached activations of every example, ragged: rows ``offsets[i]:offsets[i+1]`` of ``flat``.

    ``dtype`` is how they are stored (float32, or float16 / bfloat16 at half the bytes);
    they are always handed out as float32.
    """

    flat: np.ndarray  # [total_tokens, hidden]; a memory map when on disk
    offsets: np.ndarray  # int64 [N + 1]
    dtype: str = "float32"

    def gather(self, indices: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
        """Activations of ``indices`` zero-padded to ``width`` tokens: [len(indices), width, hidden]."""
        out = torch.zeros((len(indices), width, self.flat.shape[1]), dtype=torch.float32)
        for row, i in enumerate(indices):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            out[row, : end - start] = self._as_torch(self.flat[start:end])
        return out.to(device)

    def will_need(self, indices: Sequence[int]) -> None:
        """The activations of ``indices`` asked of the disk at once, where they are mapped from a file
        (fastif/readahead.py): a query's candidates lie scattered over it."""
        will_need(self.flat, ((self.offsets[i], self.offsets[i + 1]) for i in indices))

    def gather_batch(self, indices: Sequence[int], batch: Batch) -> torch.Tensor:
        return self.gather(indices, batch.input_ids.shape[1], batch.input_ids.device)

    def write(self, index: int, activations: torch.Tensor) -> None:
        """Example ``index``'s activations [its tokens, hidden], converted to the stored dtype."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        stored = activations.detach().to("cpu", _TORCH_DTYPES[self.dtype])
        if self.dtype == "float16" and not bool(torch.isfinite(stored).all()):
            raise DataError(f"training example {index}'s activations exceed float16's range (±65504); "
                            f"store them as bfloat16 or float32 (index.prefix_dtype)")
        if self.dtype == "bfloat16":
            stored = stored.view(torch.int16)
        self.flat[start:end] = stored.numpy()

    def _as_torch(self, rows: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(rows))  # a copy: the memory map is read-only
        return (tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor).float()

    @classmethod
    def allocate(cls, lengths: Sequence[int], hidden: int, dtype: str = "float32",
                 folder: Path | None = None) -> PrefixStore:
        """Room for every example's activations (``lengths`` tokens each): a file in ``folder`` or memory.

        On disk the flat array is a memory map written example by example, so a build holds
        a few batches of activations at a time, however many examples there are.
        """
        if dtype not in PREFIX_DTYPES:
            raise ValueError(f"prefix dtype must be one of {', '.join(PREFIX_DTYPES)}, not {dtype!r}")
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)
        shape = (int(offsets[-1]), hidden)
        if folder is None:
            flat = np.zeros(shape, dtype=_STORED_AS[dtype])
        else:
            np.save(folder / "prefix_offsets.npy", offsets)
            flat = np.lib.format.open_memmap(folder / prefix_file(dtype), mode="w+", dtype=_STORED_AS[dtype], shape=shape)
        return cls(flat=flat, offsets=offsets, dtype=dtype)

    def flush(self) -> None:
        if isinstance(self.flat, np.memmap):
            self.flat.flush()

    @classmethod
    def load(cls, folder: Path, dtype: str = "float32", mode: str = "r") -> PrefixStore | None:
        """The stored activations in ``dtype``, opened read-only (``mode`` "r+": to be written); None when none are
        stored in that dtype."""
        path = folder / prefix_file(dtype)
        if not path.is_file():
            return None
        return cls(flat=np.load(path, mmap_mode=mode), offsets=np.load(folder / "prefix_offsets.npy"), dtype=dtype)


def write_meta(folder: Path, meta: dict) -> None:
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
