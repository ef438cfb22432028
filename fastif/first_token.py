"""Run the last block for the first token only, when nothing else reads the rest.

Every sequence-classification head of the supported families (BERT's pooler,
RoBERTa's and ELECTRA's classification heads) reads only the first token of the
last block's output. That block's keys and values still need every token, but
its query, attention output and feed-forward network need only the first: about
a fifth of the block's work, exactly the same numbers. Blocks of other shapes
keep their own forward.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_bert_style(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    return (
        attention is not None
        and hasattr(getattr(attention, "self", None), "query")
        and hasattr(getattr(attention, "output", None), "LayerNorm")
        and hasattr(block, "intermediate")
        and hasattr(getattr(block, "output", None), "LayerNorm")
        and not getattr(block, "is_decoder", False)
    )


def _bert_style_first_token(block: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    attn = block.attention.self
    heads, head_size = attn.num_attention_heads, attn.attention_head_size
    batch, length, _ = hidden.shape
    query = attn.query(hidden[:, :1]).view(batch, 1, heads, head_size).transpose(1, 2)
    key = attn.key(hidden).view(batch, length, heads, head_size).transpose(1, 2)
    value = attn.value(hidden).view(batch, length, heads, head_size).transpose(1, 2)
    weights = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :1, :]
    context = torch.matmul(torch.softmax(weights, dim=-1), value).transpose(1, 2).reshape(batch, 1, heads * head_size)
    out = block.attention.output
    attended = out.LayerNorm(out.dense(context) + hidden[:, :1])
    return block.output.LayerNorm(block.output.dense(block.intermediate(attended)) + attended)


class FirstTokenLastBlock:
    """Switchable first-token forward on the last block; ``enabled`` False restores the original."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.supported = _is_bert_style(block)
        self.enabled = self.supported
        if self.supported:
            original = block.forward

            def forward(hidden_states, attention_mask=None, *args, **kwargs):
                if (
                    not self.enabled
                    or block.training
                    or any(a is not None for a in args)
                    or kwargs.get("encoder_hidden_states") is not None
                ):
                    return original(hidden_states, attention_mask, *args, **kwargs)
                return _bert_style_first_token(block, hidden_states, attention_mask)

            block.forward = forward
