"""The user's classifier made ready for influence computations, decided once.

What is changed on the model object it is given, and why:
- ``requires_grad`` is turned off for every parameter but the influence parameters, so
  that backward passes stop at the frozen prefix;
- the last block's ``forward`` is replaced by its first-token forward
  (fastif/first_token.py), where that gives the model's own logits on a probe batch;
- the ``forward`` of each frozen block below the first influence block is wrapped so
  that it can return cached activations (fastif/prefix.py); without injected
  activations it runs as before.
The model's weights and its outputs are unchanged. Which fast paths apply (the
first-token block, the top run straight from cached activations, scores from
per-example factors) is checked here against the model's own numbers and fixed for
the life of the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .encoding import Batch
from .factored import FactoredScores
from .first_token import FirstTokenLastBlock
from .modeling import Classifier, output_layer
from .objective import InfluenceObjective
from .params import find_layer_stack, first_influence_layer, freeze_all_but
from .prefix import FrozenPrefix
from .top import TopOfModel, head_of


@dataclass
class Captured:
    """What the model computes for a batch that the engine keeps (one forward pass, no gradients)."""

    logits: torch.Tensor  # [B, C]
    features: torch.Tensor  # [B, H]: first token of the last block's output
    head_inputs: torch.Tensor  # [B, A]: what the output layer reads
    hidden: torch.Tensor | None  # [B, T, H]: the frozen prefix's output, when it is cached


class PreparedModel:
    """Influence parameters, fast forward paths and the training objective of one classifier.

    ``probe``: a small batch of training examples (the longest of the first few) on which
    each fast path is checked against the model's own forward before it is kept.
    ``compile_width``: compile the top's H·v for sequences up to this length (fastif/compiled.py).
    """

    def __init__(self, classifier: Classifier, names: Sequence[str], probe: Batch, weight_decay: float,
                 decay_ignores: Sequence[str], compile_width: int | None = None):
        self.classifier = classifier
        self.model = model = classifier.model
        self.names = list(names)
        freeze_all_but(model, self.names)
        self.stack = find_layer_stack(model)
        self.last_block = self.stack.layers[len(self.stack.layers) - 1]
        first = first_influence_layer(model, self.stack, self.names)
        # Installed before the bypass, so that a bypassed last block returns its cache.
        self.first_token = FirstTokenLastBlock(self.last_block, lambda: model(**probe.model_inputs()).logits)
        self.prefix = FrozenPrefix(self.stack.layers, first) if first is not None and first >= 1 else None
        self.output_layer = output_layer(model)
        captured = self.capture(probe)  # also tells the bypass whether blocks return tuples
        top = self._checked_top(probe, captured)
        self.objective = InfluenceObjective(classifier, self.names, self.prefix, weight_decay, decay_ignores,
                                            top=top, compile_width=compile_width)
        self.factored = self._checked_factored(probe, captured.hidden) if top is not None else None

    def capture(self, batch: Batch) -> Captured:
        """Logits, first-token features, the output layer's inputs and (if cached) the frozen prefix's output."""
        sink: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        head_inputs: list[torch.Tensor] = []
        handles = [
            self.last_block.register_forward_hook(
                lambda _m, _a, out: features.append((out[0] if isinstance(out, tuple) else out)[:, 0].detach())),
            self.output_layer.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0].detach())),
        ]
        try:
            with torch.no_grad():
                if self.prefix is not None:
                    with self.prefix.capturing(sink):
                        logits = self.model(**batch.model_inputs()).logits
                else:
                    logits = self.model(**batch.model_inputs()).logits
        finally:
            for handle in handles:
                handle.remove()
        return Captured(logits=logits, features=features[0], head_inputs=head_inputs[-1].reshape(len(batch), -1),
                        hidden=sink[0] if sink else None)

    def prefix_activations(self, batch: Batch) -> torch.Tensor:
        """The frozen prefix's output for ``batch``, computed now (for ``prefix: "recompute"``)."""
        return self.capture(batch).hidden

    def _checked_top(self, probe: Batch, captured: Captured) -> TopOfModel | None:
        """The top run straight from cached activations into the last block and head, if it gives the model's logits."""
        head = head_of(self.model)
        last = len(self.stack.layers) - 1
        if head is None or not self.first_token.enabled or self.prefix is None or self.prefix.first != last:
            return None
        top = TopOfModel(self.model, self.last_block, head)
        try:
            with torch.no_grad():
                fast = top(captured.hidden, probe.attention_mask)
        except (AttributeError, TypeError, RuntimeError):
            return None  # a head of another shape than its family's usual one
        if fast.shape == captured.logits.shape and torch.allclose(fast, captured.logits, rtol=1e-4, atol=1e-5):
            return top
        return None

    def _checked_factored(self, probe: Batch, hidden: torch.Tensor) -> FactoredScores | None:
        """Scores from per-example factors (fastif/factored.py), if they give the JVPs' numbers."""
        objective = self.objective
        owners = sorted({name.rsplit(".", 1)[0] for name in objective.names})
        factored = FactoredScores(objective.top, objective.params, [self.model.get_submodule(owner) for owner in owners])
        # Two directions at once: scoring contracts many rows in one call (``contract_many``).
        directions = torch.randn(2, objective.num_params, generator=torch.Generator().manual_seed(0))
        directions = directions.to(self.classifier.device)
        uses = factored.factors(probe, hidden)
        if not factored.covers(uses):
            return None
        stacked = [torch.stack(views) for views in zip(*(objective.unflatten(d) for d in directions))]
        fast = factored.contract_many(uses, stacked, torch.arange(len(probe)))
        reference = torch.stack([objective.directional_derivatives(probe, hidden, d, with_l2=False) for d in directions], 1)
        if torch.allclose(fast, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())):
            return factored
        return None
