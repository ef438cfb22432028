"""Tokenisation with dynamic padding: each batch is padded to its own longest example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Tokenized:
    """Token ids per example (unpadded), optional segment ids, and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # int64 [N]; -1 where unknown

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    labels: Sequence[int],
    max_length: int,
) -> Tokenized:
    encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length)
    token_types = encoded.get("token_type_ids")
    return Tokenized(
        input_ids=list(encoded["input_ids"]),
        token_type_ids=list(token_types) if token_types is not None else None,
        labels=torch.as_tensor(list(labels), dtype=torch.long),
    )


def collate(tokens: Tokenized, indices: Sequence[int], pad_id: int, device: torch.device) -> Batch:
    """Gather ``indices`` into one batch padded to the longest of them."""
    width = max(len(tokens.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if tokens.token_type_ids is not None else None
    for row, i in enumerate(indices):
        seq = tokens.input_ids[i]
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
        if types is not None:
            types[row, : len(seq)] = torch.as_tensor(tokens.token_type_ids[i])
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        token_type_ids=types.to(device) if types is not None else None,
        labels=tokens.labels[list(indices)].to(device),
    )


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length so that padding wastes little work."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
