"""The training objective as a function of the influence parameters alone.

``L(z; θ) = CE(f(x; θ), y) + (wd / 2) · ||θ_decay||²`` where θ_decay excludes
biases and LayerNorm weights, as FastIF does. Every gradient, HVP and JVP in the
engine goes through this one adapter, so they all differentiate the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vjp

from .encoding import Batch
from .modeling import Classifier
from .params import decay_mask, flatten
from .prefix import FrozenPrefix
from .top import TopOfModel

if TYPE_CHECKING:
    from .compiled import CompiledHVP


class InfluenceObjective:
    def __init__(
        self,
        classifier: Classifier,
        names: Sequence[str],
        prefix: FrozenPrefix | None,
        weight_decay: float,
        decay_ignores: Sequence[str],
        top: TopOfModel | None = None,
        compile_width: int | None = None,
    ):
        """``top``: runs cached activations straight into the last block, where the model was checked to allow it.

        ``compile_width`` (the longest sequence): compile the top's H·v into one program
        (fastif/compiled.py), which checks itself against this objective's autograd H·v.
        """
        self.classifier = classifier
        self.model = classifier.model
        self.names = list(names)
        self.prefix = prefix
        self.top = top
        self.weight_decay = float(weight_decay)
        all_params = dict(self.model.named_parameters())
        self.params = [all_params[n] for n in self.names]
        self.decay = decay_mask(self.names, decay_ignores)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.num_params = sum(self.sizes)
        # A flat 0/1 mask of the decayed entries: the L2 term's gradient is wd * mask * θ.
        self.decay_flat = flatten([torch.full_like(p, float(d)) for p, d in zip(self.params, self.decay)]).detach()
        self.decay_hessian = self.weight_decay * self.decay_flat  # the L2 term's Hessian, a diagonal
        self.compiled = self._compile(top, compile_width) if compile_width is not None and top is not None else None

    def _compile(self, top: TopOfModel, width: int) -> CompiledHVP:
        from .compiled import CompiledHVP  # imports torch's compiler stack: only when asked

        return CompiledHVP(top, self.names, self.params, width, self.autograd_hvp)

    # -- vectors ---------------------------------------------------------
    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(torch.split(vector, self.sizes), self.shapes)]

    def theta(self) -> torch.Tensor:
        return flatten([p.detach() for p in self.params])

    # -- forward -----------------------------------------------------------
    def _forward(self, batch: Batch, hidden: torch.Tensor | None, params: dict | None = None) -> torch.Tensor:
        if hidden is not None and self.top is not None:
            return self.top.logits(hidden, batch.attention_mask, params)
        inputs = batch.model_inputs()
        if hidden is not None and self.prefix is not None:
            with self.prefix.injected(hidden):
                return self._call(inputs, params)
        return self._call(inputs, params)

    def _call(self, inputs: dict, params: dict | None) -> torch.Tensor:
        if params is None:
            return self.model(**inputs).logits
        return functional_call(self.model, params, args=(), kwargs=inputs, strict=False).logits

    def logits(self, batch: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(batch, hidden)

    def logits_with(self, params: dict[str, torch.Tensor], batch: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with ``params`` (influence-parameter name -> tensor) in place of the live ones (torch.func)."""
        return self._forward(batch, hidden, params)

    def loss_with(self, params: dict[str, torch.Tensor], batch: Batch, hidden: torch.Tensor | None = None,
                  with_l2: bool = True, reduction: str = "mean") -> torch.Tensor:
        """The training objective at ``params``: cross-entropy (mean or per example) plus the L2 term.

        What retraining the influence parameters minimises (fastif/quality/), so that
        the scores and the retraining they are judged against optimise the same thing.
        """
        loss = F.cross_entropy(self._forward(batch, hidden, params), batch.labels, reduction=reduction)
        if with_l2 and self.weight_decay:
            loss = loss + self.regularizer([params[n] for n in self.names])
        return loss

    def regularizer(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.weight_decay == 0.0:
            return torch.zeros((), device=self.classifier.device)
        total = sum((p * p).sum() for p, d in zip(params, self.decay) if d)
        return 0.5 * self.weight_decay * total

    def mean_loss(self, batch: Batch, hidden: torch.Tensor | None = None, with_l2: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the batch plus (``with_l2``) the L2 term, on the live parameters."""
        loss = F.cross_entropy(self._forward(batch, hidden), batch.labels)
        return loss + self.regularizer(self.params) if self.weight_decay and with_l2 else loss

    # -- derivatives -------------------------------------------------------------
    def gradient(self, batch: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """∇θ of the mean loss over ``batch``, flat [P]."""
        loss = self.mean_loss(batch, hidden)
        return flatten(torch.autograd.grad(loss, self.params))

    def hvp(self, batch: Batch, hidden: torch.Tensor | None, vectors: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """H·v for each row of ``vectors`` [m, P], H the Hessian of the batch's mean loss; into ``out`` if given.

        A LiSSA run passes the same ``out`` at every step: [m, P] is tens of MB,
        which a fresh allocation would fault in page by page each time. The L2
        term's Hessian is wd on the decayed entries, added here to either path.
        """
        out = torch.empty_like(vectors) if out is None else out
        if self.compiled is None or hidden is None or self.compiled(batch, hidden, vectors, out) is None:
            self.autograd_hvp(batch, hidden, vectors, out)
        if self.weight_decay:
            out.add_(vectors * self.decay_hessian)
        return out

    def autograd_hvp(self, batch: Batch, hidden: torch.Tensor | None, vectors: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """H·v of the cross-entropy alone, by double backward.

        The first gradient's graph is built once per batch and reused for every
        vector, so m vectors cost one forward and m backwards.
        """
        out = torch.empty_like(vectors) if out is None else out
        grads = torch.autograd.grad(self.mean_loss(batch, hidden, with_l2=False), self.params, create_graph=True)
        for row, v in enumerate(vectors):
            retain = row < len(vectors) - 1
            rows = torch.autograd.grad(grads, self.params, grad_outputs=self.unflatten(v), retain_graph=retain)
            torch.cat([g.reshape(-1) for g in rows], out=out[row])
        return out

    def ggn_vp(self, batch: Batch, hidden: torch.Tensor | None, vectors: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """G·v for each row of ``vectors`` [m, P]: the Gauss-Newton matrix Jᵀ H_out J of the batch's mean loss.

        J = ∂logits/∂θ and H_out = diag(p) − p pᵀ, the cross-entropy's Hessian in the
        logits; for softmax cross-entropy G equals the Fisher. It is positive
        semi-definite, so CG converges and LiSSA is stable for every λ > 0. Per row, one
        forward-mode pass gives J v and one backward (the VJP built once per batch) gives
        Jᵀ (H_out J v). The L2 term's Hessian, wd on the decayed entries, is added as in ``hvp``.
        """
        out = torch.empty_like(vectors) if out is None else out
        primals = {n: p.detach() for n, p in zip(self.names, self.params)}

        def logits_of(params: dict) -> torch.Tensor:
            return self._forward(batch, hidden, params)

        logits, pullback = vjp(logits_of, primals)
        probs = torch.softmax(logits.detach(), dim=-1)
        for row, v in enumerate(vectors):
            _, jv = jvp(logits_of, (primals,), (dict(zip(self.names, self.unflatten(v))),))
            curved = (probs * jv - probs * (probs * jv).sum(-1, keepdim=True)) / len(probs)
            (grads,) = pullback(curved)
            torch.cat([grads[n].reshape(-1) for n in self.names], out=out[row])
        if self.weight_decay:
            out.add_(vectors * self.decay_hessian)
        return out

    def curvature_vp(self, curvature: str, batch: Batch, hidden: torch.Tensor | None, vectors: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """C·v for ``curvature`` "hessian" or "gauss-newton", L2 term included."""
        if curvature == "gauss-newton":
            return self.ggn_vp(batch, hidden, vectors, out)
        return self.hvp(batch, hidden, vectors, out)

    def l2_derivative(self, direction: torch.Tensor) -> float:
        """⟨∇θ of the L2 term, d⟩: the same for every example."""
        if not self.weight_decay:
            return 0.0
        return self.weight_decay * float(torch.dot(self.decay_flat * self.theta(), direction))

    def directional_derivatives(self, batch: Batch, hidden: torch.Tensor | None, direction: torch.Tensor,
                                with_l2: bool = True) -> torch.Tensor:
        """⟨∇θ L(z_i), d⟩ for every example z_i of ``batch`` in one forward-mode pass, [len(batch)]."""
        primals = {n: p.detach() for n, p in zip(self.names, self.params)}
        tangents = dict(zip(self.names, self.unflatten(direction)))

        def per_example_losses(params: dict) -> torch.Tensor:
            return F.cross_entropy(self._forward(batch, hidden, params), batch.labels, reduction="none")

        _, derivative = jvp(per_example_losses, (primals,), (tangents,))
        return derivative + self.l2_derivative(direction) if with_l2 else derivative
