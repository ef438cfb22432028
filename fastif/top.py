"""The influence part of the model as one short function: cached activations to logits.

When the frozen prefix is cached and the last block is the only influence block,
a gradient, HVP or JVP needs just that block (first token only) and the head. The
model's own forward would also embed the tokens again, build its attention masks
and call every bypassed block: about three quarters of a B = 1 LiSSA step's
forward on MiniLM. ``TopOfModel`` calls the same modules directly instead; which
modules form the head is known per family and checked against the full model at
load (``InfluenceEngine`` keeps the model's own forward when they disagree).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedModel

from .tape import Tape
from .first_token import bert_style_first_token


def _pooled_head(model: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    """BERT: pooler on the first token, dropout, classifier (BertForSequenceClassification.forward)."""
    base = getattr(model, model.base_model_prefix)
    pooled = base.pooler(sequence) if base.pooler is not None else sequence[:, 0]
    return model.classifier(model.dropout(pooled))


def _sequence_head(model: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    """RoBERTa, ELECTRA: the classification head reads the first token itself."""
    return model.classifier(sequence)


HEADS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "bert": _pooled_head,
    "roberta": _sequence_head,
    "xlm-roberta": _sequence_head,
    "camembert": _sequence_head,
    "electra": _sequence_head,
}


def head_of(model: PreTrainedModel) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    return HEADS.get(getattr(model.config, "model_type", ""))


class TopOfModel(nn.Module):
    """Logits from the last block's input activations [B, T, H] and the attention mask [B, T]."""

    def __init__(self, model: PreTrainedModel, block: nn.Module, head: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model  # a submodule, so functional_call can swap its parameters by name
        self.block = [block]  # a list: not registered twice
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """``tape`` records the folded keys and values for fastif/factored.py."""
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return self.head(self.model, bert_style_first_token(self.block[0], hidden, additive, tape))

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        """With ``params`` (influence-parameter name -> tensor) in place of the live ones, as torch.func needs."""
        if params is None:
            return self(hidden, attention_mask)
        renamed = {f"model.{name}": tensor for name, tensor in params.items()}
        return functional_call(self, renamed, args=(hidden, attention_mask), strict=False)
