"""Fine-tuning the top of a classifier, FastIF-style: embeddings and lower blocks frozen."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .data import Example, texts_of
from .encoding import collate, tokenize
from .modeling import Classifier
from .params import find_layer_stack, freeze_all_but, select_influence_params


def fine_tune(
    classifier: Classifier,
    examples: Sequence[Example],
    *,
    trainable_layers: int = 1,
    epochs: int = 2,
    lr: float = 3e-4,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train the top ``trainable_layers`` blocks, pooler and head with AdamW; returns the loss per step.

    Leaves the model in eval mode with every parameter trainable again.
    """
    model = classifier.model
    stack = find_layer_stack(model)
    prefixes = [stack.layer_prefix(i) for i in range(len(stack.layers) - trainable_layers, len(stack.layers))]
    names = sorted(set(select_influence_params(model, "auto")) | set(select_influence_params(model, prefixes)))
    freeze_all_but(model, names)
    params = [p for n, p in model.named_parameters() if n in set(names)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    texts, pairs = texts_of(examples)
    tokens = tokenize(classifier.tokenizer, texts, pairs, [ex.label for ex in examples], max_length)
    pad_id = classifier.tokenizer.pad_token_id or 0
    generator = torch.Generator().manual_seed(seed)
    total = epochs * ((len(examples) + batch_size - 1) // batch_size)
    losses: list[float] = []
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = collate(tokens, order[start : start + batch_size], pad_id, classifier.device)
                loss = F.cross_entropy(model(**batch.model_inputs()).logits, batch.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if on_step:
                    on_step(len(losses), total, losses[-1])
    finally:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(True)
    return losses


@torch.no_grad()
def predict(classifier: Classifier, examples: Sequence[Example], max_length: int = 64, batch_size: int = 64) -> list[int]:
    """The predicted label id of each example."""
    texts, pairs = texts_of(examples)
    tokens = tokenize(classifier.tokenizer, texts, pairs, [0] * len(examples), max_length)
    pad_id = classifier.tokenizer.pad_token_id or 0
    out: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(tokens, list(range(start, min(start + batch_size, len(examples)))), pad_id, classifier.device)
        out.extend(classifier.model(**batch.model_inputs()).logits.argmax(dim=-1).tolist())
    return out
