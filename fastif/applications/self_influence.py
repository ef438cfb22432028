"""Self-influence I(z, z) = -∇L(z)ᵀ (H + λI)⁻¹ ∇L(z) over the training set (or a file's examples), for finding mislabels.

An example the model finds hard to fit (a wrong label, an outlier) has a large
gradient of its own loss along directions the rest of the data does not
support, so its self-influence is strongly negative: ranked most negative
first, mislabelled examples come early. The inverse-HVP is the engine's solver
run on many gradients at once (``chunk`` rows per LiSSA run: one sampled batch
serves every row), with the same curvature and damping as a query; ``identity``
skips the curvature and uses (λI)⁻¹, i.e. -‖∇L(z)‖²/λ, a useful baseline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..config import CGConfig, LissaConfig, SolverConfig
from ..curvature.solvers import LissaSolver, solver_for
from ..engine import InfluenceEngine
from ..errors import CancelledError
from ..progress import ProgressCallback
from ..query import Query, solver_config
from .examples import ExampleSet, evaluate, per_example_gradients, training_set


class BatchedHVP:
    """H_B·v for many rows at once: the engine's per-row HVP, or one double-backward vmapped over the rows.

    Which is faster depends on the model: on a tiny one the vmapped backward
    (``is_grads_batched``) wins several times over, on MiniLM the per-row loop does.
    So after a warm-up call each way is timed once and the faster one kept. Where
    vmap has no batching rule for an op, the per-row HVP is used for good.
    """

    def __init__(self, engine: InfluenceEngine, data: ExampleSet):
        self.engine, self.data = engine, data
        self.mode = "trial"  # then "batched" or "loop"
        self.calls = 0
        self.timings: dict[str, float] = {}

    def __call__(self, indices, vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if len(vectors) < 2 or self.mode == "loop":
            return self.engine.hvp(indices, vectors, out)
        if self.mode == "batched":
            return self._batched(indices, vectors)
        self.calls += 1
        way = "batched" if self.calls <= 2 else "loop"
        clock = time.perf_counter()
        try:
            result = self._batched(indices, vectors) if way == "batched" else self.engine.hvp(indices, vectors)
        except (RuntimeError, NotImplementedError):
            self.mode = "loop"
            return self.engine.hvp(indices, vectors)
        if self.calls >= 2:  # the first call warms vmap up and is not timed
            self.timings[way] = time.perf_counter() - clock
        if self.calls == 3:
            self.mode = "batched" if self.timings["batched"] < self.timings["loop"] else "loop"
        return result

    def _batched(self, indices, vectors: torch.Tensor) -> torch.Tensor:
        objective = self.engine.objective
        batch, hidden = self.data.batch(self.engine, indices)
        loss = objective.mean_loss(batch, hidden)
        grads = torch.autograd.grad(loss, objective.params, create_graph=True)
        rows = len(vectors)
        outputs = [chunk.reshape(rows, *shape) for chunk, shape in
                   zip(torch.split(vectors, objective.sizes, dim=1), objective.shapes)]
        result = torch.autograd.grad(grads, objective.params, grad_outputs=outputs, is_grads_batched=True)
        return torch.cat([r.reshape(rows, -1) for r in result], dim=1)


def _chosen_or_all(indices: Sequence[int] | None, data: ExampleSet) -> list[int]:
    """The training indices asked for, as ints; every one of `data` when None."""
    return list(range(len(data))) if indices is None else [int(i) for i in indices]


def self_influence_scores(engine: InfluenceEngine, indices: Sequence[int] | None = None, *,
                          solver: SolverConfig | LissaConfig | CGConfig = SolverConfig(), chunk: int = 32,
                          on_progress: ProgressCallback | None = None) -> np.ndarray:
    """I(z_i, z_i) for each training index (all when None), with the same curvature and damping as a query."""
    data = training_set(engine)
    indices = _chosen_or_all(indices, data)
    values = np.zeros(len(indices), dtype=np.float64)
    inverse = solver_for(solver_config(solver), engine.curvature)
    if isinstance(inverse, LissaSolver) and solver_config(solver).curvature == "hessian":
        # Many rows: a batched double backward, in place of the one-vector compiled step too.
        inverse = dataclasses.replace(inverse, product=BatchedHVP(engine, data), fused_step=None)

    def cancel_only(stage: str, done: int, total: int) -> bool:
        return bool(on_progress("self_influence", finished, len(indices))) if on_progress else False

    finished = 0
    for start in range(0, len(indices), max(1, chunk)):
        members = indices[start : start + max(1, chunk)]
        grads = per_example_gradients(engine, data, members)
        solved = inverse.solve(grads, lambda d, t: cancel_only("s_test", d, t)).vectors.to(grads.device)
        values[start : start + len(members)] = (-(grads * solved).sum(dim=1)).double().cpu().numpy()
        finished += len(members)
        if on_progress and on_progress("self_influence", finished, len(indices)):
            raise CancelledError("cancelled during self-influence")
        del grads, solved
    return values


def rank_self_influence(engine: InfluenceEngine, indices: Sequence[int] | None = None, *,
                        solver: SolverConfig | LissaConfig | CGConfig = SolverConfig(), chunk: int = 32,
                        on_progress: ProgressCallback | None = None) -> list[dict]:
    """One item per example, most negative self-influence first, with its loss and predicted label."""
    data = training_set(engine)
    indices = _chosen_or_all(indices, data)
    values = self_influence_scores(engine, indices, solver=solver, chunk=chunk, on_progress=on_progress)
    with torch.no_grad():
        evaluation = evaluate(engine, data, indices=indices)
    labels = engine.classifier.labels
    order = np.argsort(values, kind="stable")
    items = []
    for rank, pos in enumerate(order):
        example = data.examples[indices[pos]]
        item = {
            "rank": rank, "train_index": indices[pos], "self_influence": float(values[pos]),
            "loss": float(evaluation.losses[pos]), "text": example.text, "label": labels[example.label],
            "predicted": labels[int(evaluation.predictions[pos])],
        }
        if example.text_pair is not None:
            item["text_pair"] = example.text_pair
        items.append(item)
    return items


def inputs_self_influence(engine: InfluenceEngine, queries: Sequence[Query], *,
                          solver: SolverConfig | LissaConfig | CGConfig = SolverConfig(),
                          on_progress: ProgressCallback | None = None) -> list[dict]:
    """I(z, z) of examples outside the training set (each with its label, else the predicted one), in input order.

    The same quantity as ``self_influence_scores`` of a training example, from the query path:
    the inputs' test gradients, solved together in one run of the solver. Each item carries the
    cross-entropy of the predicted probabilities at the label used, and the predicted label.
    """
    engine.prepare(on_progress)
    encoded = engine.encode(queries)
    grads = engine.test_gradients(encoded)
    solved = engine.solve(grads, solver, on_progress).vectors.to(grads.device)
    values = (-(grads * solved).sum(dim=1)).double().cpu().numpy()
    labels = engine.classifier.labels
    items = []
    for row, query in enumerate(queries):
        used = encoded.labels_used[row]
        probs = encoded.probs[row].astype(np.float64)
        item = {"input_index": row, "self_influence": float(values[row]),
                "loss": float(-np.log(max(probs[used], np.finfo(np.float64).tiny))), "text": query.text,
                "label": labels[used], "predicted": labels[int(probs.argmax())]}
        if query.text_pair is not None:
            item["text_pair"] = query.text_pair
        items.append(item)
    return items
