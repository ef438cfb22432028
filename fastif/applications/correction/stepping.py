"""The parameters a correction changes, the optimiser that changes them, and the way back.

A correction may step more than the influence parameters ("trainable": every
parameter above the frozen prefix, as FastIF stepped all its fine-tuned layers),
but never one the cached prefix activations depend on, so every cached activation
stays valid while the model moves.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ...engine import InfluenceEngine
from ...params import above_prefix, decay_mask, select_influence_params
from ..examples import ExampleSet


def stepped_names(engine: InfluenceEngine, params: str | Sequence[str]) -> list[str]:
    """The names ``params`` selects ("influence", "trainable", or name prefixes above the frozen prefix)."""
    if params == "influence":
        return list(engine.objective.names)
    first = engine.prefix.first if engine.prefix is not None else None
    movable = above_prefix(engine.model, engine.stack, first)
    if params == "trainable":
        return movable
    chosen = select_influence_params(engine.model, list(params))
    frozen = sorted(set(chosen) - set(movable))
    if frozen:
        raise ValueError(f"params {frozen[:3]} lie below block {first}, whose cached inputs a step would make stale; "
                         "register the model with influence params that include them")
    return chosen


@contextlib.contextmanager
def _tracking(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` for the duration (the engine freezes all but the influence parameters)."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class ParameterUpdate:
    """Optimiser steps on chosen parameters of the live model; ``reset`` puts them back as they were."""

    def __init__(self, engine: InfluenceEngine, params: str | Sequence[str], optimizer: str, lr: float, l2: bool):
        self.engine = engine
        self.names = stepped_names(engine, params)
        named = dict(engine.model.named_parameters())
        self.params = [named[n] for n in self.names]
        self.original = [p.detach().clone() for p in self.params]
        self.original_digest = self.digest()
        self.decay = decay_mask(self.names, engine.spec.weight_decay_ignores)
        self.weight_decay = engine.objective.weight_decay if l2 else 0.0
        self.optimizer_name, self.lr = optimizer, lr
        self.optimizer = self._new_optimizer()

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.params, lr=self.lr)
        return torch.optim.SGD(self.params, lr=self.lr)

    def loss(self, data: ExampleSet, indices: Sequence[int]) -> torch.Tensor:
        """Mean cross-entropy of ``indices`` of ``data`` plus the L2 term over the stepped parameters."""
        batch, hidden = data.batch(self.engine, indices)
        loss = F.cross_entropy(self.engine.objective.logits(batch, hidden).float(), batch.labels)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * sum((p * p).sum() for p, d in zip(self.params, self.decay) if d)
        return loss

    def step(self, data: ExampleSet, indices: Sequence[int], steps: int = 1) -> None:
        """``steps`` optimiser steps on the loss of ``indices`` (none when there are no indices)."""
        if not len(indices):
            return
        for _ in range(steps):
            with _tracking(self.params):
                grads = torch.autograd.grad(self.loss(data, indices), self.params)
            for param, grad in zip(self.params, grads):
                param.grad = grad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def digest(self) -> str:
        """A hash of the stepped parameters' current values: the cache identity of the model as it is now."""
        hasher = hashlib.blake2b(digest_size=16)
        for param in self.params:
            hasher.update(param.detach().float().cpu().numpy().tobytes())
        return hasher.hexdigest()

    def values(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load(self, values: Sequence[torch.Tensor]) -> None:
        for param, value in zip(self.params, values):
            param.copy_(value)

    def reset(self) -> None:
        """The original values and a fresh optimiser (a new strategy or trial starts from the model as registered)."""
        self.load(self.original)
        for param in self.params:
            param.grad = None
        self.optimizer = self._new_optimizer()


class WeightsKeyedCache:
    """A tensor cache for an updated model: its s_test entries also name the weights they were computed with.

    Per-round s_test of an updated model must never be read as the registered model's (or
    another round's), so the key carries the stepped parameters' digest. Only s_test is
    kept: the anchors' gradients are a few backward passes to redo, and a parameter-sized
    entry per anchor and round would fill the cache with entries nothing else reads.
    """

    KINDS = ("s_test",)

    def __init__(self, inner, digest: str):
        self.inner, self.digest = inner, digest

    def get(self, kind: str, payload: dict):
        return self.inner.get(kind, {**payload, "weights": self.digest}) if kind in self.KINDS else None

    def put(self, kind: str, payload: dict, tensor: torch.Tensor) -> None:
        if kind in self.KINDS:
            self.inner.put(kind, {**payload, "weights": self.digest}, tensor)
