"""What a correction did to the evaluation set, in a form a user can act on.

Per label, the confusion matrix, and the very examples it fixed and broke, so that a
gain on one label bought with a loss on another shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..examples import Evaluation, ExampleSet

LISTED_EXAMPLES = 20  # fixed and broken examples listed per trial (all are counted)


def gold_labels(data: ExampleSet) -> np.ndarray:
    return np.array([ex.label for ex in data.examples], dtype=np.int64)


def by_label(evaluation: Evaluation, gold: np.ndarray, labels: Sequence[str]) -> dict:
    """Per gold label: count, correct, accuracy; the confusion matrix (rows gold, columns predicted)."""
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (gold, evaluation.predictions), 1)
    per_label = {}
    for i, name in enumerate(labels):
        count = int(confusion[i].sum())
        if count:
            per_label[name] = {"count": count, "correct": int(confusion[i, i]), "accuracy": float(confusion[i, i] / count)}
    return {"per_label": per_label, "confusion": confusion.tolist()}


def outcome(before: Evaluation, after: Evaluation, gold: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy and loss after, their change, how many predictions were fixed and broken, per label."""
    right_before, right_after = before.predictions == gold, after.predictions == gold
    return {
        "accuracy": after.accuracy, "loss": after.loss,
        "delta_accuracy": after.accuracy - before.accuracy, "delta_loss": after.loss - before.loss,
        "fixed": int((right_after & ~right_before).sum()), "broken": int((right_before & ~right_after).sum()),
        **by_label(after, gold, labels),
    }


def changed_ids(before: Evaluation, after: Evaluation, gold: np.ndarray) -> dict:
    """Positions in the evaluation set of every example fixed and broken."""
    right_before, right_after = before.predictions == gold, after.predictions == gold
    return {"fixed_ids": np.flatnonzero(right_after & ~right_before).tolist(),
            "broken_ids": np.flatnonzero(right_before & ~right_after).tolist()}


def changed_examples(before: Evaluation, after: Evaluation, data: ExampleSet, labels: Sequence[str],
                     limit: int = LISTED_EXAMPLES) -> dict:
    """The first ``limit`` examples fixed and broken, with their predictions before and after."""
    gold = gold_labels(data)
    right_before, right_after = before.predictions == gold, after.predictions == gold

    def listed(mask: np.ndarray) -> list[dict]:
        items = []
        for i in np.flatnonzero(mask)[:limit]:
            example = data.examples[int(i)]
            item = {"index": int(i), "text": example.text, "label": labels[example.label],
                    "before": labels[int(before.predictions[i])], "after": labels[int(after.predictions[i])]}
            if example.text_pair is not None:
                item["text_pair"] = example.text_pair
            items.append(item)
        return items

    return {"fixed_examples": listed(right_after & ~right_before), "broken_examples": listed(right_before & ~right_after)}


def summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, extremes and every value (one per trial)."""
    array = np.array(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "values": [float(v) for v in array]}


FINAL_FIELDS = ("accuracy", "loss", "delta_accuracy", "delta_loss", "anchor_accuracy", "anchor_loss")


def strategy_summary(trials: list[dict]) -> dict:
    """Over trials: the final model's figures, and accuracy and loss after every round."""
    rounds = len(trials[0]["rounds"])
    by_round = [{"round": r, **{field: summary([t["rounds"][r][field] for t in trials])
                                for field in ("accuracy", "loss", "delta_accuracy")}} for r in range(rounds)]
    if trials[0]["rounds"][0].get("control") is not None:
        for r, entry in enumerate(by_round):
            entry["control_accuracy"] = summary([t["rounds"][r]["control"]["accuracy"] for t in trials])
    control = None
    if trials[0]["final"].get("control") is not None:
        control = {field: summary([t["final"]["control"][field] for t in trials]) for field in ("accuracy", "delta_accuracy")}
    return {**{field: summary([t["final"][field] for t in trials]) for field in FINAL_FIELDS}, "by_round": by_round,
            "control": control}
