"""Influence results as plain JSON-ready dicts: the shape of API.md's result item."""

from __future__ import annotations

from .engine import EncodedQueries, Influence, InfluenceEngine


def _example(engine: InfluenceEngine, influence: Influence, position: int) -> dict:
    train_index = int(influence.indices[position])
    example = engine.train[train_index]
    item = {
        "train_index": train_index,
        "score": float(influence.scores[position]),
        "text": example.text,
        "label": engine.classifier.labels[example.label],
        "knn_distance": None if influence.distances is None else float(influence.distances[position]),
    }
    if example.text_pair is not None:
        item["text_pair"] = example.text_pair
    return item


def result_item(
    engine: InfluenceEngine, encoded: EncodedQueries, influence: Influence, input_index: int, top: int, with_scores: bool = False
) -> dict:
    """One input's prediction, its most helpful and harmful training examples, and diagnostics."""
    labels = engine.classifier.labels
    probs = encoded.probs[input_index]
    helpful, harmful = influence.ranked(top)
    item = {
        "input_index": input_index,
        "prediction": {"label": labels[int(probs.argmax())], "probs": {name: float(p) for name, p in zip(labels, probs)}},
        "label_used": labels[encoded.labels_used[input_index]],
        "helpful": [_example(engine, influence, pos) for pos in helpful],
        "harmful": [_example(engine, influence, pos) for pos in harmful],
        "diagnostics": {
            **{key: value for key, value in influence.solver.items() if key != "converged"},
            "converged": bool(influence.converged),
            "lissa_converged": bool(influence.converged),  # kept for existing clients
            "s_test_norm": float(influence.s_test_norm),
            "cached": bool(influence.cached),
            "seconds": {stage: round(float(sec), 4) for stage, sec in influence.seconds.items()},
        },
    }
    if with_scores:
        item["scores"] = [
            {"train_index": int(i), "score": float(s)} for i, s in zip(influence.indices, influence.scores)
        ]
    return item


def result_items(
    engine: InfluenceEngine, encoded: EncodedQueries, influences: list[Influence], top: int, with_scores: bool = False
) -> list[dict]:
    """One item per input in input order; with a group, every input shares the group's influence."""
    count = len(encoded.labels_used)
    return [
        result_item(engine, encoded, influences[i] if len(influences) == count else influences[0], i, top, with_scores)
        for i in range(count)
    ]
