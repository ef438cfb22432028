"""FastIF's reference implementation, the baseline for the ``speed`` suite's (a) and (b).

This follows the structure of FastIF's ``influence_utils/nn_influence_utils.py``
(``compute_gradients``, ``compute_hessian_vector_products``, ``compute_s_test``,
``compute_influences``) on an ordinary copy of the model, loaded with plain
``from_pretrained`` (eager attention), so none of the engine's tricks is involved:

- every gradient, HVP and score runs the **whole** model forward (no cached
  frozen prefix, no first-token last block);
- a training example's gradient is taken one example at a time, with
  ``create_graph=True`` as FastIF's ``compute_gradients`` does, and dotted with
  s_test (``compute_influences``' per-example loop);
- each LiSSA step is a fresh forward, a first gradient with ``create_graph=True``
  and a second backward (double backward), as ``compute_hessian_vector_products``.

Two deliberate differences, neither of which changes a ranking: the LiSSA
sampling stream is the engine's (``fastif.curvature.lissa_generator``) so that the
reference and the engine see the same batches and their numbers can be compared;
and FastIF's final division of s_test by the number of LiSSA steps (a uniform
factor) is left out, so that the scores are on the engine's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastif.curvature import lissa_generator

from .data import Row


class FastIFReference:
    def __init__(self, model_dir: Path, names: Sequence[str], max_length: int, weight_decay: float = 0.0,
                 decay_ignores: Sequence[str] = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = max_length
        self.names = list(names)
        chosen = set(self.names)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in chosen)  # FastIF's params_filter: gradients of the influence params only
        by_name = dict(self.model.named_parameters())
        self.params = [by_name[n] for n in self.names]
        self.weight_decay = weight_decay
        self.decay = [not any(t in n for t in decay_ignores) for n in self.names]

    # -- FastIF's building blocks ---------------------------------------------------------------
    def encode(self, rows: Sequence[Row], labels: Sequence[int] | None = None) -> tuple[dict, torch.Tensor]:
        inputs = dict(self.tokenizer([r.text for r in rows], truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt"))
        target = torch.tensor(list(labels) if labels is not None else [r.label for r in rows])
        return inputs, target

    def loss(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """``get_loss_with_weight_decay``: mean cross-entropy of the batch through the whole model (+ L2)."""
        loss = F.cross_entropy(self.model(**inputs).logits, labels)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * sum((p * p).sum() for p, d in zip(self.params, self.decay) if d)
        return loss

    def gradient(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``compute_gradients``: note ``create_graph=True`` even where no second derivative follows."""
        self.model.zero_grad()
        return torch.autograd.grad(self.loss(inputs, labels), self.params, create_graph=True)

    def hvp(self, inputs: dict, labels: torch.Tensor, vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``compute_hessian_vector_products``: forward, gradient with graph, then a second backward."""
        self.model.zero_grad()
        grads = torch.autograd.grad(self.loss(inputs, labels), self.params, create_graph=True)
        self.model.zero_grad()
        return torch.autograd.grad(grads, self.params, grad_outputs=list(vectors), only_inputs=True)

    # -- FastIF's loops ---------------------------------------------------------------------------
    def test_gradient(self, row: Row, label: int) -> list[torch.Tensor]:
        inputs, target = self.encode([row], [label])
        return [g.detach() for g in self.gradient(inputs, target)]

    def lissa_batches(self, num_train: int, batch_size: int, seed: int = 0, repeat: int = 0):
        """The engine's LiSSA sampling stream: the same training indices, step by step."""
        generator = lissa_generator(seed, repeat)
        while True:
            yield torch.randint(num_train, (batch_size,), generator=generator).tolist()

    def s_test(self, v: list[torch.Tensor], train: Sequence[Row], steps: int, batch_size: int, damp: float, scale: float,
               seed: int = 0, on_step: Callable[[int], None] | None = None) -> tuple[list[torch.Tensor], int]:
        """``compute_s_test``: ``h ← v + (1 − damp)·h − H·h / scale`` over ``steps`` sampled batches, ``s = h / scale``.

        Returns (s_test, steps run). Run fewer ``steps`` than a full depth to time a sample.
        """
        estimate = [x.clone() for x in v]
        batches = self.lissa_batches(len(train), batch_size, seed)
        for step in range(steps):
            indices = next(batches)
            inputs, target = self.encode([train[i] for i in indices])
            curvature = self.hvp(inputs, target, estimate)
            with torch.no_grad():
                estimate = [a + (1 - damp) * b - c / scale for a, b, c in zip(v, estimate, curvature)]
            if on_step:
                on_step(step + 1)
        return [x / scale for x in estimate], steps

    def influences(self, s_test: Sequence[torch.Tensor], rows: Sequence[Row],
                   on_step: Callable[[int], None] | None = None) -> np.ndarray:
        """``compute_influences``: one training example at a time, ``-⟨∇L(z), s_test⟩``."""
        scores = np.zeros(len(rows))
        for position, row in enumerate(rows):
            inputs, target = self.encode([row])
            grad = self.gradient(inputs, target)
            with torch.no_grad():
                scores[position] = sum(-torch.sum(x * y) for x, y in zip(grad, s_test)).item()
            if on_step:
                on_step(position + 1)
        return scores

    def predict(self, row: Row) -> int:
        with torch.no_grad():
            inputs, _ = self.encode([row])
            return int(self.model(**inputs).logits.argmax(-1))

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def unflat(self, vector: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(vector[start:start + p.numel()].view_as(p).clone())
            start += p.numel()
        return out
