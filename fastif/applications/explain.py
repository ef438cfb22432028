"""Explain predictions by their most helpful and harmful training examples."""

from __future__ import annotations

from collections.abc import Sequence

from ..engine import InfluenceEngine
from ..query import Query, Solver, TensorCache
from ..progress import ProgressCallback
from ..report import result_items


def agreement(item: dict) -> dict:
    """How many of the top helpful (and harmful) examples carry the predicted label."""
    predicted = item["prediction"]["label"]
    helpful, harmful = item["helpful"], item["harmful"]
    with_label = sum(1 for e in helpful if e["label"] == predicted)
    return {
        "predicted_label": predicted,
        "helpful": len(helpful),
        "helpful_with_predicted_label": with_label,
        "helpful_fraction": (with_label / len(helpful)) if helpful else None,
        "harmful": len(harmful),
        "harmful_with_predicted_label": sum(1 for e in harmful if e["label"] == predicted),
    }


def explain(
    engine: InfluenceEngine,
    queries: Sequence[Query],
    *,
    k: int | None,
    top: int,
    solver: Solver,
    cache: TensorCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[dict]:
    """One item per input: the influence result item plus ``agreement``.

    Each input is explained on its own (no grouping); influence is taken with
    respect to the input's given label, else the predicted one.
    """
    encoded, influences = engine.analyze(queries, k=k, solver=solver, group=False, cache=cache, on_progress=on_progress)
    items = result_items(engine, encoded, influences, top)
    for item in items:
        item["agreement"] = agreement(item)
    return items
