"""Which parameters influence is computed over, found from the module structure.

``auto`` is FastIF's choice: the fine-tuned top of the model, i.e. the last
transformer block and everything after the encoder (pooler, classifier head).
It works for any encoder whose blocks sit in one ``nn.ModuleList`` (BERT,
RoBERTa, DistilBERT, DeBERTa, ELECTRA, ...).

Whatever is chosen, the biases of attention's key projections are left out: softmax
over the keys ignores a score added to all of them, and a query's product with the
key bias is such a score, so these biases never change the output. Their gradient
is zero in exact arithmetic and rounding noise in floating point, which s_test, in
a direction of no curvature, divides by the damping: on `fastif bench scale`'s MiniLM
(an untrained head) that noise moved every score by about 4 % of their spread, in
float32 (a 1e-6 change to the activations reordered the scores as much as storing
them in float16 did).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import ParamSelectionError


@dataclass(frozen=True)
class LayerStack:
    """The encoder's block list and where it sits in the model."""

    layers: nn.ModuleList
    path: str  # e.g. "bert.encoder.layer"
    encoder_path: str  # the module holding the list, e.g. "bert.encoder"

    def layer_prefix(self, index: int) -> str:
        return f"{self.path}.{index}."


def find_layer_stack(model: PreTrainedModel) -> LayerStack:
    """The longest ModuleList of same-type blocks: the transformer's layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ParamSelectionError(f"{type(model).__name__}: found no list of transformer blocks")
    path = best[0]
    return LayerStack(layers=best[1], path=path, encoder_path=path.rpartition(".")[0])


def _around_encoder(model: PreTrainedModel, stack: LayerStack) -> tuple[list[str], list[str]]:
    """Name prefixes of the modules that run before the encoder and after it.

    Children of the base model are registered in forward order (embeddings,
    encoder, pooler); every child of the full model other than the base model is
    part of the head.
    """
    base_name = model.base_model_prefix
    before: list[str] = []
    after: list[str] = []
    base = getattr(model, base_name, None)
    encoder_child = stack.encoder_path.split(".")[1] if stack.encoder_path.startswith(base_name + ".") else None
    if base is not None and encoder_child is not None:
        seen_encoder = False
        for child_name, _ in base.named_children():
            if child_name == encoder_child:
                seen_encoder = True
            else:
                (after if seen_encoder else before).append(f"{base_name}.{child_name}")
    after.extend(name for name, _ in model.named_children() if name != base_name)
    return before, after


def _under(name: str, prefix: str) -> bool:
    """``bert.encoder.layer.5`` covers ``bert.encoder.layer.5.output.dense.weight`` but not ``...layer.50``."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


# The (query, key, value) Linear children of a softmax attention, by model family: BERT, RoBERTa and ELECTRA;
# DistilBERT; BART-style encoders.
_ATTENTION_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))


def key_biases(model: nn.Module) -> set[str]:
    """Names of the biases of attention's key projections: parameters that never change the output."""
    found = set()
    for name, module in model.named_modules():
        for query, key, value in _ATTENTION_PROJECTIONS:
            projections = [getattr(module, child, None) for child in (query, key, value)]
            if all(isinstance(p, nn.Linear) for p in projections) and projections[1].bias is not None:
                found.add(f"{name}.{key}.bias" if name else f"{key}.bias")
    return found


def select_influence_params(model: PreTrainedModel, spec: str | Sequence[str] = "auto") -> list[str]:
    """Names of the influence parameters, in the model's own order (attention's key biases left out)."""
    names = [name for name, _ in model.named_parameters()]
    if spec == "auto":
        stack = find_layer_stack(model)
        prefixes = [stack.layer_prefix(len(stack.layers) - 1), *_around_encoder(model, stack)[1]]
    else:
        prefixes = [spec] if isinstance(spec, str) else list(spec)
        if not prefixes:
            raise ParamSelectionError("the list of parameter-name prefixes is empty")
        for prefix in prefixes:
            if not any(_under(n, prefix) for n in names):
                sample = ", ".join(names[:4])
                raise ParamSelectionError(f"no parameter name starts with '{prefix}' (names look like {sample}, ...)")
    ignored = key_biases(model)
    chosen = [n for n in names if any(_under(n, p) for p in prefixes) and n not in ignored]
    if not chosen:
        raise ParamSelectionError(f"{', '.join(prefixes)} holds only attention key biases, which never change the "
                                  "output (softmax ignores them): choose parameters that do")
    return chosen


def first_influence_layer(model: PreTrainedModel, stack: LayerStack, names: Sequence[str]) -> int | None:
    """Index of the first block holding an influence parameter (``len(layers)`` if none does).

    None when an influence parameter runs before the blocks or is shared by all of
    them (embeddings, DeBERTa's relative embeddings): then no prefix of the
    network is frozen and nothing can be cached.
    """
    before, _ = _around_encoder(model, stack)
    first = len(stack.layers)
    for name in names:
        index = next((i for i in range(len(stack.layers)) if _under(name, stack.layer_prefix(i))), None)
        if index is not None:
            first = min(first, index)
        elif _under(name, stack.encoder_path) or any(_under(name, p) for p in before):
            return None
    return first


def above_prefix(model: PreTrainedModel, stack: LayerStack, first: int | None) -> list[str]:
    """Every parameter the frozen prefix does not cover: blocks ``first`` and up, and all after the encoder.

    Changing these keeps the cached prefix activations valid. ``first`` None (nothing
    is cached) means every parameter of the model.
    """
    names = [name for name, _ in model.named_parameters()]
    if first is None:
        return names
    _, after = _around_encoder(model, stack)
    prefixes = [stack.layer_prefix(i) for i in range(first, len(stack.layers))] + after
    return [n for n in names if any(_under(n, p) for p in prefixes)]


def decay_mask(names: Sequence[str], ignores: Sequence[str]) -> list[bool]:
    """True for the parameters the explicit L2 term applies to (not biases or LayerNorm weights)."""
    return [not any(token in name for token in ignores) for name in names]


def count(model: nn.Module, names: Sequence[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def freeze_all_but(model: nn.Module, names: Sequence[str]) -> None:
    """Only the influence parameters track gradients; backward stops at the frozen prefix."""
    chosen = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])
