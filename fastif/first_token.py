"""Run the last block for the first token only, when nothing else reads the rest.

Every sequence-classification head of the supported families (BERT's pooler,
RoBERTa's and ELECTRA's classification heads) reads only the first token of the
last block's output, so that block needs its query, attention output and
feed-forward network for the first token alone. Its keys and values are folded
into the first token's query and attention weights instead of being projected
for every token; per head h, with X the block's input rows:

    scores_h = q_h · (X W_k,hᵀ + b_k,h)ᵀ = (q_h W_k,h) Xᵀ + q_h · b_k,h
    context_h = p_h (X W_v,hᵀ + b_v,h) = (p_h X) W_v,hᵀ + b_v,h      (Σ_t p_h,t = 1)

which costs two projections of one vector per head instead of two of every
token: the same numbers up to rounding (checked against the full block at load),
at a fraction of the work in every forward, gradient, HVP and JVP. Blocks of
other shapes keep their own forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .tape import Tape, bias_contraction


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


def bert_style_first_token(block: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                           tape: Tape | None = None) -> torch.Tensor:
    """A BERT-style block's output at the first token, [B, 1, H]; ``attention_mask`` is additive, [B, 1, ·, T].

    ``tape`` records how the folded keys and values enter (fastif/factored.py); the
    block's Linear and LayerNorm modules are recorded by their own hooks.
    """
    attn = block.attention.self
    heads, head_size = attn.num_attention_heads, attn.attention_head_size
    batch, _, width = hidden.shape
    first = hidden[:, :1]
    query = attn.query(first).view(batch, heads, head_size).transpose(0, 1)  # [heads, batch, head_size]
    folded_key = torch.bmm(query, attn.key.weight.view(heads, head_size, width))  # q_h W_k,h: [heads, batch, width]
    weights = torch.bmm(folded_key.transpose(0, 1), hidden.transpose(1, 2))  # [batch, heads, tokens]
    if attn.key.bias is not None:
        key_bias = (query * attn.key.bias.view(heads, 1, head_size)).sum(-1)  # q_h · b_k,h: [heads, batch]
        weights = weights + key_bias.transpose(0, 1).unsqueeze(-1)
    weights = weights * getattr(attn, "scaling", head_size**-0.5)
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, 0, :]
    mixed = torch.bmm(torch.softmax(weights, dim=-1), hidden).transpose(0, 1)  # p_h X: [heads, batch, width]
    per_head = torch.bmm(mixed, attn.value.weight.view(heads, head_size, width).transpose(1, 2))  # [heads, batch, head_size]
    context = per_head.transpose(0, 1).reshape(batch, 1, heads * head_size)
    if attn.value.bias is not None:
        context = context + attn.value.bias
    if tape is not None:
        # Per head, the key weight's per-example gradient is q_hᵀ ∂L/∂(q_h W_k,h), the value
        # weight's ∂L/∂context_hᵀ (p_h X): both rank one.
        query_, mixed_ = query.detach(), mixed.detach()

        def head_rows(per_head_vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            """[heads, B, head_size] -> [n, heads, heads·head_size]: head h's vector in head h's rows, zeros elsewhere."""
            picked = per_head_vectors[:, rows].transpose(0, 1)  # [n, heads, head_size]
            eye = torch.eye(heads, dtype=picked.dtype, device=picked.device)
            return (eye[None, :, :, None] * picked[:, :, None, :]).reshape(len(rows), heads, heads * head_size)

        # Each contracted over the width first (einsum goes left to right): a product with an inner size
        # of width, not head_size, which ran the key's scoring at a third of the value's speed.
        tape(attn.key.weight, folded_key, lambda s, grad, rows: torch.einsum(
            "rhsw,hbw,hbs->br", s.view(len(s), heads, head_size, width), grad[:, rows], query_[:, rows]),
            lambda grad, rows: (head_rows(query_, rows), grad[:, rows].transpose(0, 1)))
        if attn.key.bias is not None:
            tape(attn.key.bias, key_bias, lambda s, grad, rows: torch.einsum(
                "hbs,rhs,hb->br", query_[:, rows], s.view(len(s), heads, head_size), grad[:, rows]))
        tape(attn.value.weight, per_head, lambda s, grad, rows: torch.einsum(
            "hbw,rhsw,hbs->br", mixed_[:, rows], s.view(len(s), heads, head_size, width), grad[:, rows]),
            lambda grad, rows: (head_rows(grad, rows), mixed_[:, rows].transpose(0, 1)))
        if attn.value.bias is not None:  # Σ_t p_h,t = 1: the bias of the value projection of p_h X
            tape(attn.value.bias, context, bias_contraction, joins=attn.value.weight)
    out = block.attention.output
    attended = out.LayerNorm(out.dense(context) + first)
    return block.output.LayerNorm(block.output.dense(block.intermediate(attended)) + attended)


class FirstTokenLastBlock:
    """The first-token forward installed on the last block, if it gives the full block's logits.

    Decided once, here: ``logits()`` runs the whole model on a probe batch, once with the
    block's own forward and once with the first-token one; where they differ (a head that
    reads more than the first token) the block keeps its own forward and ``enabled`` is
    False. The block's ``forward`` attribute is replaced while it is installed; the
    original still runs in training mode and for decoder-style calls.
    """

    def __init__(self, block: nn.Module, logits: Callable[[], torch.Tensor]):
        self.block = block
        self.supported = _is_bert_style(block)
        self.enabled = False
        if not self.supported:
            return
        with torch.no_grad():
            full = logits()
            original = block.forward

            def forward(hidden_states, attention_mask=None, *args, **kwargs):
                if block.training or any(a is not None for a in args) or kwargs.get("encoder_hidden_states") is not None:
                    return original(hidden_states, attention_mask, *args, **kwargs)
                return bert_style_first_token(block, hidden_states, attention_mask)

            block.forward = forward
            fast = logits()
        self.enabled = bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-5))
        if not self.enabled:
            block.forward = original
