"""Every job's result items are checked against their api_schemas model before they are stored (workers/results.py).

The response models ignore unknown fields (clients must tolerate newer servers), so without the
check a field the worker writes but the contract lacks, or a contract field the worker stopped
writing, would reach clients unnoticed. Through ``run_job`` on the real Redis: a drifting item
fails the job with nothing stored; a conforming one is stored exactly as it was built.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api_schemas import ExplainItem, GraphResult, ResultItem
from records.jobs import JobStore
from records.settings import settings_from
from workers import runner
from workers.context import WorkerContext
from workers.results import ITEM_MODELS, ContractDrift, checked, stored_items


def influence_item(**changes) -> dict:
    item = {
        "input_index": 0,
        "prediction": {"label": "positive", "probs": {"negative": 0.25, "positive": 0.75}},
        "label_used": "positive",
        "helpful": [{"train_index": 3, "score": -0.5, "text": "good film", "label": "positive", "knn_distance": None}],
        "harmful": [{"train_index": 7, "score": 0.25, "text": "a", "label": "negative", "knn_distance": 1.5,
                     "text_pair": "b"}],
        "diagnostics": {"solver": "ekfac", "curvature": "gauss-newton", "damping_scope": "block", "damping_ratio": None,
                        "iterations": 0, "damping": 0.1, "converged": True, "lissa_converged": True,
                        "s_test_norm": 2.0, "cached": False, "seconds": {"gradients": 0.01, "s_test": 0.02}},
    }
    item.update(changes)
    return item


@pytest.fixture
def ctx(redis_client, redis_url, tmp_path, monkeypatch) -> WorkerContext:
    context = WorkerContext(settings_from(redis_url=redis_url, data_root=tmp_path))
    monkeypatch.setattr(runner, "context", lambda: context)
    return context


def test_a_conforming_item_is_stored_exactly_as_built(ctx: WorkerContext) -> None:
    item = influence_item()
    job = JobStore(ctx.redis).create("influence", "m", {"output_path": "out.jsonl"})
    assert runner.run_job(job.id, lambda run: [item], ResultItem) == "succeeded"
    raw = list(ctx.jobs.iter_raw_results(job.id))
    # Same keys in the same order, optional ones only where given (text_pair, no scores), nulls kept.
    assert raw == [json.dumps(item, separators=(",", ":"))]
    written = (ctx.settings.data_root / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in written] == [item]


@pytest.mark.parametrize(("item", "complaint"), [
    (influence_item(scores_v2=[1.0]), "item.scores_v2 is not a field of the contract"),
    (influence_item(diagnostics={**influence_item()["diagnostics"], "block_count": 4}),
     "item.diagnostics.block_count is not a field of the contract"),
    (influence_item(helpful=[{"train_index": 3, "score": -0.5, "text": "x", "label": "positive", "knn_distance": None,
                              "weight": 1.0}]), "item.helpful[0].weight is not a field of the contract"),
], ids=["unknown-field", "unknown-diagnostic", "unknown-nested-field"])
def test_an_item_with_a_field_the_contract_lacks_fails_the_job_before_anything_is_stored(ctx, item, complaint) -> None:
    job = JobStore(ctx.redis).create("influence", "m", {"output_path": "out.jsonl"})
    assert runner.run_job(job.id, lambda run: [influence_item(), item], ResultItem) == "failed"
    record = ctx.jobs.require(job.id)
    assert record.error.code == "internal-error"
    assert "ContractDrift" in record.error.message and complaint in record.error.message
    assert ctx.jobs.results(job.id) == (0, [])
    assert not (ctx.settings.data_root / "out.jsonl").exists()


@pytest.mark.parametrize("item", [
    {k: v for k, v in influence_item().items() if k != "label_used"},
    influence_item(diagnostics={k: v for k, v in influence_item()["diagnostics"].items() if k != "converged"}),
    influence_item(input_index=True),  # a bool is no index, though Python calls it an int
    influence_item(prediction={"label": "positive", "probs": {"positive": float("nan")}}),
], ids=["missing-field", "missing-diagnostic", "bool-for-int", "nan"])
def test_an_item_missing_a_field_or_with_a_wrong_value_fails_the_job(ctx, item) -> None:
    job = JobStore(ctx.redis).create("influence", "m", {})
    assert runner.run_job(job.id, lambda run: [item], ResultItem) == "failed"
    record = ctx.jobs.require(job.id)
    assert record.error.code == "internal-error" and "ValidationError" in record.error.message
    assert ctx.jobs.results(job.id) == (0, [])


def test_a_model_of_another_kind_is_refused(ctx) -> None:
    explained = ExplainItem.model_validate({**influence_item(), "agreement": {
        "predicted_label": "positive", "helpful": 1, "helpful_with_predicted_label": 1, "helpful_fraction": 1.0,
        "harmful": 1, "harmful_with_predicted_label": 0}})
    with pytest.raises(ContractDrift, match="ExplainItem given where GraphResult belongs"):
        stored_items(GraphResult, [explained])
    # An ExplainItem is an influence item plus `agreement`, written last.
    assert list(stored_items(ExplainItem, [explained])[0])[-1] == "agreement"


def test_every_job_kind_has_its_item_model() -> None:
    assert set(ITEM_MODELS) == {"build_model", "influence", "explain", "graph", "correct", "self_influence", "quality"}


def test_a_graph_must_name_its_files() -> None:
    """The picture routes read `files` from the stored graph: the contract requires it."""
    graph = {"nodes": [], "edges": [], "groups": [], "settings": {"k": 10, "top": 3, "threshold": None},
             "diagnostics": {"lissa_converged": True, "s_test_norms": []},
             "files": {"png": "graphs/j.png"}, "images": {"png": "/v1/jobs/j/graph.png"}}
    assert stored_items(GraphResult, [graph]) == [graph]
    with pytest.raises(ValidationError, match="files"):
        checked(GraphResult, {k: v for k, v in graph.items() if k != "files"})
