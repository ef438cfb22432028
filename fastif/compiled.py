"""H·v on the top of the model as one program compiled by ``torch.compile``.

Eager autograd spends most of a B = 1 LiSSA step on MiniLM's top block (the
double backward of one block and the head) dispatching a few hundred small
operations: the arithmetic is about 60 MFLOP. Compiled by inductor, the same
Hessian-vector product (forward-over-reverse, ``torch.func``) takes about half
the time, and with LiSSA's update fused into the same program a query at FastIF's
configuration runs 1.4–1.5× faster (bench/results/speed.md). Compiling costs 10–30 s once per process,
model and batch shape, so it is an option for long-running workers and long
LiSSA runs (``compile_hvp``), off by default.

Every sampled batch is padded to the longest training example, so that one
compilation serves every batch of a size: padded tokens are masked out, which
leaves the numbers as they were. The first product is checked against the eager
one; on any difference or error the engine stays eager and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from .top import TopOfModel

log = logging.getLogger("fastif.compiled")

EagerHVP = Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


UPDATE_RTOL = 1e-5  # a LiSSA update is v + (1 - damp)·h - H·h/scale: float32 rounding of the first two terms


class CompiledHVP:
    """The compiled H·v and fused LiSSA step of one engine's top; ``usable`` turns False for good on a failure."""

    def __init__(self, top: TopOfModel, names: list[str], params: list[torch.Tensor], width: int, eager: EagerHVP,
                 rtol: float = 1e-3):
        self.top = top
        self.names = list(names)
        self.params = {name: p.detach() for name, p in zip(names, params)}  # share storage: in-place updates show
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.width = width
        self.eager = eager
        self.rtol = rtol
        self.usable = True
        self.checked = False
        self.step_checked = False
        self._coefficient_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._compiled = torch.compile(self._hvp, dynamic=False)
        self._compiled_step = torch.compile(self._step, dynamic=False)

    def _hvp(self, params: dict, vector: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        tangents = {name: chunk.view(shape)
                    for name, chunk, shape in zip(self.names, torch.split(vector, self.sizes), self.shapes)}

        def mean_loss(p: dict) -> torch.Tensor:
            return F.cross_entropy(self.top.logits(hidden, mask, p), labels)

        _, product = jvp(grad(mean_loss), (params,), (tangents,))
        return torch.cat([product[name].reshape(-1) for name in self.names])

    def _step(self, params: dict, h: torch.Tensor, vector: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
              labels: torch.Tensor, decay: torch.Tensor, keep: torch.Tensor, shrink: torch.Tensor):
        """One LiSSA update ``v + keep·h − shrink·(H h + decay ⊙ h)`` and its norm, fused into one program."""
        updated = vector + keep * h - shrink * (self._hvp(params, h, hidden, mask, labels) + decay * h)
        return updated, torch.linalg.vector_norm(updated)

    def _coefficients(self, damp: float, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """1 − damp and 1 / scale as tensors, not floats: other values then need no new compilation."""
        key = (damp, scale, dtype)
        if key not in self._coefficient_tensors:
            self._coefficient_tensors[key] = (torch.tensor(1.0 - damp, dtype=dtype), torch.tensor(1.0 / scale, dtype=dtype))
        return self._coefficient_tensors[key]

    def _padded(self, batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        pad = self.width - hidden.shape[1]
        if pad < 0:
            return None
        return F.pad(hidden, (0, 0, 0, pad)), F.pad(batch.attention_mask, (0, pad))

    def step(self, batch, hidden: torch.Tensor, h: torch.Tensor, vectors: torch.Tensor, decay: torch.Tensor,
             damp: float, scale: float) -> tuple[torch.Tensor, float] | None:
        """LiSSA's ``h ← v + (1 − damp)·h − H h / scale`` for every row, and the largest row norm; None if not usable.

        ``decay`` is the L2 term's Hessian diagonal (wd on the decayed entries).
        """
        padded = self._padded(batch, hidden) if self.usable else None
        if padded is None:
            return None
        keep, shrink = self._coefficients(damp, scale, h.dtype)
        try:
            rows = [self._compiled_step(self.params, h[row], vectors[row], *padded, batch.labels, decay, keep, shrink)
                    for row in range(len(h))]
        except Exception as err:  # no C++ compiler, an unsupported op, ...: stay eager
            self._give_up(f"torch.compile failed ({type(err).__name__}: {err})")
            return None
        # One input (FastIF's usual query) needs no copy into a stacked tensor.
        updated = rows[0][0].unsqueeze(0) if len(rows) == 1 else torch.stack([row[0] for row in rows])
        if not self.step_checked:
            self.step_checked = True
            if not self._same_as_eager(batch, hidden, h, padded, decay, updated, vectors, damp, scale):
                return None
        return updated, max(float(row[1]) for row in rows)

    def _same_as_eager(self, batch, hidden, h, padded, decay, updated, vectors, damp: float, scale: float) -> bool:
        """The first step against the eager one: its H·v to ``rtol``, and the whole update to float32 rounding.

        The H·v term is only 1/scale of the update, so the update alone would hide an error in it.
        """
        product = self.eager(batch, hidden, h, None)
        compiled_product = self._compiled(self.params, h[0], *padded, batch.labels)
        expected = vectors + (1.0 - damp) * h - (product + decay * h) / scale
        product_error = float((compiled_product - product[0]).norm() / product[0].norm().clamp_min(1e-30))
        update_error = float((updated - expected).norm() / expected.norm().clamp_min(1e-30))
        if not (product_error <= self.rtol and update_error <= UPDATE_RTOL):  # also catches NaN
            self._give_up(f"its LiSSA step differs from the eager one (H·v by {product_error:.2e}, "
                          f"the update by {update_error:.2e})")
            return False
        return True

    def __call__(self, batch, hidden: torch.Tensor, vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """H·v of the cross-entropy (no L2 term) into ``out``; None when the compiled path is not usable."""
        padded = self._padded(batch, hidden) if self.usable else None
        if padded is None:
            return None
        try:
            for row, vector in enumerate(vectors):
                out[row] = self._compiled(self.params, vector, *padded, batch.labels)
        except Exception as err:  # no C++ compiler, an unsupported op, ...: stay eager
            self._give_up(f"torch.compile failed ({type(err).__name__}: {err})")
            return None
        if not self.checked:
            self.checked = True
            expected = self.eager(batch, hidden, vectors, None)
            difference = (out - expected).norm() / expected.norm().clamp_min(1e-30)
            if not torch.isfinite(difference) or difference > self.rtol:
                self._give_up(f"its H·v differs from the eager one by {difference.item():.2e}")
                out.copy_(expected)
        return out

    def _give_up(self, why: str) -> None:
        self.usable = False
        log.warning("compiled HVP disabled, staying eager: %s", why)
