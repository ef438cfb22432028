"""Result items as the wire contract's models, and the one check every stored item passes.

The engine answers in plain dataclasses (EncodedQueries, Influence) and plain dicts (a graph,
a self-influence ranking, a correction or quality report); the HTTP shapes are api_schemas'
models. Influence and explain items are built here, as those models. Every job's items then
pass ``stored_items`` on their way to Redis (workers/runner.py ``finish``): validated strictly
as the job kind's model, and refused when the model would drop a field it does not know or
change a value, so that a producer and the contract cannot drift apart silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel

from api_schemas import (
    Agreement,
    BuildResult,
    CorrectionReport,
    ExplainItem,
    GraphResult,
    QualityReport,
    ResultItem,
    SelfInfluenceItem,
)

if TYPE_CHECKING:  # the engine's types, for annotations only: this module runs no engine code
    from fastif import Influence, InfluenceEngine

Item = TypeVar("Item", bound=BaseModel)

# The model each job kind's result items are stored as (the `kind` of the job record).
ITEM_MODELS: dict[str, type[BaseModel]] = {
    "build_model": BuildResult,
    "influence": ResultItem,
    "explain": ExplainItem,
    "graph": GraphResult,
    "correct": CorrectionReport,
    "self_influence": SelfInfluenceItem,
    "quality": QualityReport,
}


class Predictions(Protocol):
    """The inputs' predictions an item reports: what EncodedQueries holds (or a parallel job's ScoringPlan)."""

    probs: np.ndarray  # [inputs, classes]
    labels_used: Sequence[int]  # the label each input's influence is taken for


class ContractDrift(ValueError):
    """A result item that its contract model does not describe (an unknown field, a value it would change)."""


# -- checking ------------------------------------------------------------------------------------
def checked(model: type[Item], fields: dict[str, Any]) -> Item:
    """``fields`` as ``model``: validated strictly, and refused if the model would not keep them as given.

    The response models ignore unknown fields (clients must tolerate newer servers), so a field the
    contract lacks would vanish without a word; here it is a ContractDrift instead. Optional fields
    left out of ``fields`` stay unset, and so stay out of the stored item.
    """
    return _checked(model, fields)[0]


def _checked(model: type[Item], fields: dict[str, Any]) -> tuple[Item, dict[str, Any]]:
    item = model.model_validate(fields, strict=True)
    kept = item.model_dump(mode="json", exclude_unset=True)
    if kept != fields:
        raise ContractDrift(f"{model.__name__}: {_difference(fields, kept, 'item')}")
    return item, kept


def _difference(given: Any, kept: Any, where: str) -> str:
    """Where ``kept`` first differs from ``given`` (they are known to differ)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                return f"{where}.{key} is not a field of the contract"
            if value != kept[key]:
                return _difference(value, kept[key], f"{where}.{key}")
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for position, (value, stored) in enumerate(zip(given, kept)):
            if value != stored:
                return _difference(value, stored, f"{where}[{position}]")
    return f"{where} is {given!r} but would be stored as {kept!r}"


def stored_items(model: type[BaseModel], items: Sequence[BaseModel | dict[str, Any]]) -> list[dict[str, Any]]:
    """The items as they are stored: each one a ``model`` (built as one, or a dict ``checked`` as one),
    JSON-ready, with exactly the fields that were set."""
    stored = []
    for item in items:
        if isinstance(item, model):
            stored.append(item.model_dump(mode="json", exclude_unset=True))
        elif isinstance(item, BaseModel):
            raise ContractDrift(f"{type(item).__name__} given where {model.__name__} belongs")
        else:
            stored.append(_checked(model, item)[1])
    return stored


# -- influence and explain items -----------------------------------------------------------------
def influence_items(
    engine: InfluenceEngine, encoded: Predictions, influences: Sequence[Influence], top: int,
    with_scores: bool = False,
) -> list[ResultItem]:
    """One item per input in input order; with a group, every input shares the group's influence."""
    return [checked(ResultItem, fields) for fields in _influence_fields(engine, encoded, influences, top, with_scores)]


def result_items(
    engine: InfluenceEngine, encoded: Predictions, influences: Sequence[Influence], top: int,
    with_scores: bool = False,
) -> list[dict[str, Any]]:
    """The influence items as they are stored and served: JSON-ready dicts (what `fastif analyze --json` prints)."""
    return stored_items(ResultItem, influence_items(engine, encoded, influences, top, with_scores))


def explain_items(
    engine: InfluenceEngine, encoded: Predictions, influences: Sequence[Influence], top: int,
) -> list[ExplainItem]:
    """The influence item of each input plus how many of its examples carry the predicted label."""
    explained = []
    for item in influence_items(engine, encoded, influences, top):
        # The influence item's fields as they were set (so unset optional ones stay out), `agreement` last.
        explained.append(ExplainItem(**{name: getattr(item, name) for name in item.model_fields_set},
                                     agreement=agreement(item)))
    return explained


def agreement(item: ResultItem) -> Agreement:
    """How many of the top helpful (and harmful) examples carry the predicted label."""
    predicted = item.prediction.label
    helpful_with_label = sum(example.label == predicted for example in item.helpful)
    return Agreement(
        predicted_label=predicted,
        helpful=len(item.helpful),
        helpful_with_predicted_label=helpful_with_label,
        helpful_fraction=helpful_with_label / len(item.helpful) if item.helpful else None,
        harmful=len(item.harmful),
        harmful_with_predicted_label=sum(example.label == predicted for example in item.harmful),
    )


def _influence_fields(
    engine: InfluenceEngine, encoded: Predictions, influences: Sequence[Influence], top: int, with_scores: bool,
) -> list[dict[str, Any]]:
    count = len(encoded.labels_used)
    shared = len(influences) != count  # a group: one influence for every input
    return [_item_fields(engine, encoded, influences[0] if shared else influences[row], row, top, with_scores)
            for row in range(count)]


def _item_fields(
    engine: InfluenceEngine, encoded: Predictions, influence: Influence, input_index: int, top: int,
    with_scores: bool,
) -> dict[str, Any]:
    """One input's prediction, its most helpful and harmful training examples, and diagnostics (a ResultItem's fields)."""
    labels = engine.classifier.labels
    probs = encoded.probs[input_index]
    helpful, harmful = influence.ranked(top)
    fields: dict[str, Any] = {
        "input_index": input_index,
        "prediction": {"label": labels[int(probs.argmax())], "probs": {name: float(p) for name, p in zip(labels, probs)}},
        "label_used": labels[encoded.labels_used[input_index]],
        "helpful": [_example_fields(engine, influence, position) for position in helpful],
        "harmful": [_example_fields(engine, influence, position) for position in harmful],
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
        fields["scores"] = [{"train_index": int(i), "score": float(s)} for i, s in zip(influence.indices, influence.scores)]
    return fields


def _example_fields(engine: InfluenceEngine, influence: Influence, position: int) -> dict[str, Any]:
    """An Influential's fields; ``text_pair`` only for pair tasks."""
    train_index = int(influence.indices[position])
    example = engine.train[train_index]
    fields = {
        "train_index": train_index,
        "score": float(influence.scores[position]),
        "text": example.text,
        "label": engine.classifier.labels[example.label],
        "knn_distance": None if influence.distances is None else float(influence.distances[position]),
    }
    if example.text_pair is not None:
        fields["text_pair"] = example.text_pair
    return fields
