"""Correct model errors with influence (FastIF §5), by FastIF's iterative protocol.

Given a pool of failing inputs with their correct labels (the anchors), each round
draws a few anchors, finds the training examples (or examples of a pool never
trained on) whose upweighting most lowers their loss on the model as the earlier
rounds left it (kNN candidates per sign, one s_test for the anchors' mean gradient,
scores), and takes an optimiser step on the most helpful of them. The same rounds on
the most harmful points and on random points are the controls; every strategy of a
trial draws the same anchors, so they differ only in the points. The model's
parameters are as registered when ``correct`` returns.

The kNN index and the EK-FAC factors are those of the registered model: the
candidates' keys and the curvature are not refitted per round (a round's steps are
small), but every gradient, s_test and score is of the updated model, and the
per-round caches are keyed by its weights.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...config import SolverConfig
from ...data import Example
from ...engine import InfluenceEngine
from ...query import Query, Solver, TensorCache, solver_config
from ...errors import CancelledError
from ...progress import ProgressCallback
from ..examples import ExampleSet, encode_examples, evaluate, training_set
from .config import CorrectionConfig
from .report import by_label, changed_examples, changed_ids, gold_labels, outcome, strategy_summary
from .selection import RoundInfluence, choose, round_influence
from .stepping import ParameterUpdate, WeightsKeyedCache


@dataclass
class Correction:
    """What correct() found; ``report`` is the JSON-ready result."""

    report: dict
    points: dict[str, list[list[int]]]  # strategy -> per trial, every point stepped on, round by round
    candidates: ExampleSet
    corrected: dict[str, list[torch.Tensor]]  # strategy -> trial 0's final values of the stepped parameters
    stepped: list[str]  # names of the stepped parameters


def _point(engine: InfluenceEngine, data: ExampleSet, index: int, score: float | None) -> dict:
    example = data.examples[index]
    item = {"index": int(index), "text": example.text, "label": engine.classifier.labels[example.label]}
    if example.text_pair is not None:
        item["text_pair"] = example.text_pair
    if score is not None:
        item["score"] = float(score)
    return item


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, since: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - since


def correct(
    engine: InfluenceEngine,
    anchors: Sequence[Query],
    evaluation: Sequence[Example],
    *,
    config: CorrectionConfig = CorrectionConfig(),
    solver: Solver = SolverConfig(),
    pool: Sequence[Example] | None = None,
    control: Sequence[Example] | None = None,
    cache: TensorCache | None = None,
    round_cache: TensorCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> Correction:
    """Run every strategy for every trial, round by round; the parameters are restored when this returns.

    ``control``, when given, is a second evaluation set (say, held-out data of every
    label) measured after every round too: what the correction costs outside the slice.
    ``cache`` serves the registered model (round 0); ``round_cache`` (default: ``cache``)
    keeps the updated models' s_test, keyed by their weights.
    """
    if any(q.label is None for q in anchors):
        raise ValueError("every anchor needs its correct label")
    if not evaluation:
        raise ValueError("the evaluation set is empty")
    per_round = config.per_round(len(anchors))
    clock, started = _Clock(), time.perf_counter()
    engine.prepare(on_progress)
    update = ParameterUpdate(engine, config.params, config.optimizer, config.lr, config.l2)
    candidates = training_set(engine) if pool is None else encode_examples(
        engine, pool, with_index=True, on_progress=on_progress, stage="encoding pool")
    eval_set = encode_examples(engine, evaluation, on_progress=on_progress, stage="encoding evaluation set")
    resolved = engine.encode(anchors).labels_used  # label names or ids -> ids
    anchor_queries = [Query(q.text, q.text_pair, label) for q, label in zip(anchors, resolved)]
    anchor_set = encode_examples(engine, [Example(q.text, q.text_pair, q.label) for q in anchor_queries])
    labels, gold = engine.classifier.labels, gold_labels(eval_set)
    before_eval, before_anchor = evaluate(engine, eval_set), evaluate(engine, anchor_set)
    control_set = encode_examples(engine, control, stage="encoding control set") if control else None
    before_control = evaluate(engine, control_set) if control_set else None
    control_gold = gold_labels(control_set) if control_set else None
    clock.add("prepare", started)

    trials: dict[str, list[dict]] = {s: [] for s in config.strategies}
    points: dict[str, list[list[int]]] = {s: [] for s in config.strategies}
    corrected: dict[str, list[torch.Tensor]] = {}
    first_points: dict[str, list[dict]] = {}
    converged, total, done = True, config.trials * len(config.strategies) * config.rounds, 0
    try:
        for trial in range(config.trials):
            seed = config.seed + trial
            draw = np.random.default_rng(seed)
            draws = [np.sort(draw.choice(len(anchors), size=per_round, replace=False)) for _ in range(config.rounds)]
            base = solver_config(solver)
            trial_solver = dataclasses.replace(base, lissa=dataclasses.replace(base.lissa, seed=base.lissa.seed + trial))
            known: dict[tuple, RoundInfluence] = {}  # helpful and harmful share round 0 (same model, same anchors)
            for strategy in config.strategies:
                update.reset()
                random_points = np.random.default_rng((seed, 1))
                rounds, used = [], []
                for number, drawn in enumerate(draws):
                    influence = None
                    if strategy != "random":
                        since = time.perf_counter()
                        digest = update.digest()
                        key = (digest, tuple(int(i) for i in drawn))
                        if key not in known:
                            updated = round_cache if round_cache is not None else cache
                            now = cache if digest == update.original_digest else (
                                WeightsKeyedCache(updated, digest) if updated is not None else None)
                            known[key] = round_influence(engine, candidates, [anchor_queries[i] for i in drawn], trial_solver,
                                                         config.k, now, on_progress)
                        influence = known[key]
                        converged = converged and bool(influence.diagnostics.get("converged", True))
                        clock.add("influence", since)
                    chosen = choose(strategy, influence, config.num_points, len(candidates), random_points)
                    if trial == 0 and number == 0:
                        first_points[strategy] = [_point(engine, candidates, i, s) for i, s in
                                                  zip(chosen.indices, chosen.scores or [None] * len(chosen.indices))]
                    since = time.perf_counter()
                    update.step(candidates, chosen.indices, config.steps)
                    clock.add("stepping", since)
                    since = time.perf_counter()
                    after = evaluate(engine, eval_set)
                    after_control = evaluate(engine, control_set) if control_set else None
                    clock.add("evaluation", since)
                    used.extend(chosen.indices)
                    rounds.append({
                        "round": number, "anchors": [int(i) for i in drawn],
                        "points": [{"index": i, **({"score": s} if s is not None else {})} for i, s in
                                   zip(chosen.indices, chosen.scores or [None] * len(chosen.indices))],
                        "points_used": len(chosen.indices), "points_available": chosen.available,
                        "s_test_norm": influence.s_test_norm if influence else None,
                        **outcome(before_eval, after, gold, labels), **changed_ids(before_eval, after, gold),
                        "control": outcome(before_control, after_control, control_gold, labels) if control_set else None,
                    })
                    done += 1
                    if on_progress and on_progress("correction", done, total):
                        raise CancelledError("cancelled during correction")
                after_anchor = evaluate(engine, anchor_set)
                final = {**outcome(before_eval, after, gold, labels), "anchor_accuracy": after_anchor.accuracy,
                         "anchor_loss": after_anchor.loss, **changed_examples(before_eval, after, eval_set, labels),
                         "control": outcome(before_control, after_control, control_gold, labels) if control_set else None}
                if trial == 0:
                    corrected[strategy] = update.values()
                trials[strategy].append({"trial": trial, "seed": seed, "points": used, "rounds": rounds, "final": final})
                points[strategy].append(used)
    finally:
        update.reset()

    report = {
        "candidates": {"source": "train" if pool is None else "pool", "size": len(candidates), "k": config.k},
        "anchors": {"count": len(anchors), "per_round": per_round, "before": before_anchor.summary()},
        "evaluation": {"size": len(eval_set), "before": {**before_eval.summary(), **by_label(before_eval, gold, labels)}},
        "control": {"size": len(control_set), "before": {**before_control.summary(),
                                                         **by_label(before_control, control_gold, labels)}} if control_set else None,
        "settings": {"rounds": config.rounds, "anchors_per_round": per_round, "num_points": config.num_points,
                     "lr": config.lr, "steps": config.steps, "optimizer": config.optimizer,
                     "params": config.params if isinstance(config.params, str) else list(config.params),
                     "num_params_stepped": update.num_params, "l2": config.l2, "trials": config.trials, "seed": config.seed},
        "strategies": {s: {**strategy_summary(trials[s]), "trials": trials[s], "first_trial_points": first_points.get(s, [])}
                       for s in config.strategies},
        "diagnostics": {"converged": converged, "lissa_converged": converged,
                        "seconds": {k: round(v, 4) for k, v in clock.seconds.items()}},
    }
    return Correction(report=report, points=points, candidates=candidates, corrected=corrected, stepped=update.names)


def save_corrected(engine: InfluenceEngine, correction: Correction, strategy: str, out_dir: Path) -> Path:
    """Save the model as ``strategy``'s trial 0 left it (safetensors, with the tokenizer); the live model is restored.

    The folder is an ordinary Hugging Face model directory, written beside and renamed into place.
    """
    if strategy not in correction.corrected:
        raise ValueError(f"the correction ran no '{strategy}' strategy")
    named = dict(engine.model.named_parameters())
    params = [named[n] for n in correction.stepped]
    original = [p.detach().clone() for p in params]
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        with torch.no_grad():
            for param, value in zip(params, correction.corrected[strategy]):
                param.copy_(value)
        partial.mkdir(parents=True, exist_ok=True)
        engine.model.save_pretrained(partial)
        engine.classifier.tokenizer.save_pretrained(partial)
    finally:
        with torch.no_grad():
            for param, value in zip(params, original):
                param.copy_(value)
    if not any(partial.glob("*.safetensors")):
        raise RuntimeError(f"{partial}: the model was not saved as safetensors")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    partial.replace(out_dir)
    return out_dir
