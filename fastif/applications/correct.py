"""Correct model errors with influence (FastIF §5).

Given a group of failing inputs with their correct labels (the anchors), find
the training examples (or examples of a pool that was never trained on) whose
upweighting most lowers the anchors' loss: kNN candidates around the anchors'
mean feature, one s_test for the group's mean gradient, scores over the
candidates. Then take ``steps`` gradient steps of size ``lr`` on the
``num_points`` most helpful of them, on the influence parameters only, and
measure an evaluation set before and after. The same procedure with the most
harmful points and with random points is the control. Each trial starts from
the original parameters (they are restored after every trial); trial t uses
LiSSA seed ``seed + t`` for s_test and seed ``seed + t`` for the random points.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import SolverConfig
from ..data import Example
from ..engine import InfluenceEngine, Query, Solver, TensorCache, solver_config
from ..errors import CancelledError
from ..progress import ProgressCallback
from .examples import ExampleSet, encode_examples, evaluate, gradient, influence_scores, restore, snapshot, step, training_set

STRATEGIES = ("helpful", "harmful", "random")


@dataclass(frozen=True)
class CorrectionConfig:
    num_points: int = 10
    lr: float = 1e-4
    steps: int = 1
    trials: int = 3
    seed: int = 0
    k: int | None = 1000  # kNN candidates around the anchors' mean feature; None = score every candidate
    strategies: tuple[str, ...] = STRATEGIES

    def __post_init__(self) -> None:
        if self.num_points < 1 or self.steps < 1 or self.trials < 1:
            raise ValueError("num_points, steps and trials must be at least 1")
        if not self.lr > 0:
            raise ValueError("lr must be positive")
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {self.strategies}")


@dataclass
class Correction:
    """What correct() found; ``report()`` is the JSON-ready result."""

    report: dict
    points: dict[str, list[list[int]]]  # strategy -> per trial, candidate indices used
    candidates: ExampleSet


def _check(cancel: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    if cancel and cancel(stage, done, total):
        raise CancelledError(f"cancelled during {stage}")


def _point(engine: InfluenceEngine, data: ExampleSet, index: int, score: float | None) -> dict:
    example = data.examples[index]
    item = {"index": int(index), "text": example.text, "label": engine.classifier.labels[example.label]}
    if example.text_pair is not None:
        item["text_pair"] = example.text_pair
    if score is not None:
        item["score"] = float(score)
    return item


def _apply(engine: InfluenceEngine, data: ExampleSet, indices: Sequence[int], config: CorrectionConfig) -> None:
    for _ in range(config.steps):
        step(engine, gradient(engine, data, indices), config.lr)


def _summary(values: list[float]) -> dict:
    array = np.array(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max())}


def correct(
    engine: InfluenceEngine,
    anchors: Sequence[Query],
    evaluation: Sequence[Example],
    *,
    config: CorrectionConfig = CorrectionConfig(),
    solver: Solver = SolverConfig(),
    pool: Sequence[Example] | None = None,
    cache: TensorCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> Correction:
    """Run every strategy for every trial; the model's parameters are as before when this returns."""
    if any(q.label is None for q in anchors):
        raise ValueError("every anchor needs its correct label")
    clock = time.perf_counter()
    engine.prepare(on_progress)
    candidates = training_set(engine) if pool is None else encode_examples(
        engine, pool, with_index=True, on_progress=on_progress, stage="encoding pool")
    eval_set = encode_examples(engine, evaluation, on_progress=on_progress, stage="encoding evaluation set")
    anchor_set = encode_examples(engine, [Example(q.text, q.text_pair, label) for q, label in
                                          zip(anchors, engine.encode(anchors).labels_used)])
    # The group: mean gradient of the anchors with their correct labels, mean feature for kNN.
    plan = engine.plan(anchors, group=True, cache=cache)
    nearest, distances = candidates.nearest(plan.search[0], config.k)
    seconds = {"prepare": time.perf_counter() - clock}

    original = snapshot(engine)
    before_eval, before_anchor = evaluate(engine, eval_set), evaluate(engine, anchor_set)
    runs: dict[str, list[dict]] = {s: [] for s in config.strategies}
    points: dict[str, list[list[int]]] = {s: [] for s in config.strategies}
    chosen_detail: dict[str, list[dict]] = {}
    converged = True
    num_points = min(config.num_points, len(nearest))
    total = config.trials * len(config.strategies)
    try:
        for trial in range(config.trials):
            seed = config.seed + trial
            scores = None
            if {"helpful", "harmful"} & set(config.strategies):
                config_ = solver_config(solver)
                trial_solver = dataclasses.replace(config_, lissa=dataclasses.replace(config_.lissa, seed=config_.lissa.seed + trial))
                clock = time.perf_counter()
                s_tests, diagnostics, _ = engine.cached_s_test(plan, trial_solver, cache, on_progress)
                converged = converged and bool(diagnostics["converged"])
                seconds["s_test"] = seconds.get("s_test", 0.0) + time.perf_counter() - clock
                clock = time.perf_counter()
                scores = influence_scores(engine, candidates, s_tests[0], nearest, on_progress=on_progress)
                seconds["scoring"] = seconds.get("scoring", 0.0) + time.perf_counter() - clock
            order = np.argsort(scores, kind="stable") if scores is not None else None
            for strategy in config.strategies:
                if strategy == "helpful":
                    chosen = order[:num_points]
                elif strategy == "harmful":
                    chosen = order[::-1][:num_points]
                else:
                    rng = np.random.default_rng(seed)
                    chosen = None
                    picked = rng.choice(len(candidates), size=min(num_points, len(candidates)), replace=False)
                indices = [int(nearest[c]) for c in chosen] if chosen is not None else [int(i) for i in picked]
                if trial == 0:
                    chosen_detail[strategy] = [
                        _point(engine, candidates, idx, scores[c] if chosen is not None else None)
                        for idx, c in zip(indices, chosen if chosen is not None else [None] * len(indices))
                    ]
                clock = time.perf_counter()
                _apply(engine, candidates, indices, config)
                after_eval, after_anchor = evaluate(engine, eval_set), evaluate(engine, anchor_set)
                restore(engine, original)
                seconds["correction"] = seconds.get("correction", 0.0) + time.perf_counter() - clock
                runs[strategy].append({
                    "trial": trial, "seed": seed, "points": indices,
                    "accuracy": after_eval.accuracy, "loss": after_eval.loss,
                    "delta_accuracy": after_eval.accuracy - before_eval.accuracy,
                    "delta_loss": after_eval.loss - before_eval.loss,
                    "anchor_accuracy": after_anchor.accuracy, "anchor_loss": after_anchor.loss,
                    "fixed": int(((after_eval.predictions == _labels(eval_set)) & (before_eval.predictions != _labels(eval_set))).sum()),
                    "broken": int(((after_eval.predictions != _labels(eval_set)) & (before_eval.predictions == _labels(eval_set))).sum()),
                })
                points[strategy].append(indices)
                _check(on_progress, "correction", trial * len(config.strategies) + config.strategies.index(strategy) + 1, total)
    finally:
        restore(engine, original)
    strategies = {}
    for strategy, trials in runs.items():
        strategies[strategy] = {
            "accuracy": _summary([t["accuracy"] for t in trials]),
            "delta_accuracy": _summary([t["delta_accuracy"] for t in trials]),
            "loss": _summary([t["loss"] for t in trials]),
            "delta_loss": _summary([t["delta_loss"] for t in trials]),
            "anchor_accuracy": _summary([t["anchor_accuracy"] for t in trials]),
            "trials": trials,
            "first_trial_points": chosen_detail.get(strategy, []),
        }
    report = {
        "candidates": {"source": "train" if pool is None else "pool", "size": len(candidates),
                       "scored": int(len(nearest)), "k": config.k},
        "anchors": {"count": len(anchors), "before": before_anchor.summary()},
        "evaluation": {"size": len(eval_set), "before": before_eval.summary()},
        "settings": {"num_points": num_points, "lr": config.lr, "steps": config.steps, "trials": config.trials,
                     "seed": config.seed},
        "strategies": strategies,
        "diagnostics": {"lissa_converged": converged, "s_test_norm": None,
                        "seconds": {k: round(v, 4) for k, v in seconds.items()}},
    }
    return Correction(report=report, points=points, candidates=candidates)


def _labels(data: ExampleSet) -> np.ndarray:
    return np.array([ex.label for ex in data.examples], dtype=np.int64)


def save_corrected(engine: InfluenceEngine, data: ExampleSet, indices: Sequence[int], config: CorrectionConfig,
                   out_dir: Path) -> Path:
    """Apply the correction to a copy-on-write of the parameters, save the model (safetensors), restore.

    The folder is an ordinary Hugging Face model directory with the tokenizer.
    """
    original = snapshot(engine)
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        _apply(engine, data, indices, config)
        partial.mkdir(parents=True, exist_ok=True)
        engine.model.save_pretrained(partial)
        engine.classifier.tokenizer.save_pretrained(partial)
    finally:
        restore(engine, original)
    if not any(partial.glob("*.safetensors")):
        raise RuntimeError(f"{partial}: the model was not saved as safetensors")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    partial.replace(out_dir)
    return out_dir
