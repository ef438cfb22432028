"""A short chaos run (bench/chaos.py): a minute of jobs while every kind of fault strikes at least once.

Real processes on loopback: a redis-server with an append-only file, two Celery workers, the API,
and the faults done to them (SIGKILLed pool processes and whole workers, SIGTERM restarts of a
worker, of Redis and of the API, a full state directory). Nothing may be lost, wrong or duplicated.
"""

from __future__ import annotations

import json

import pytest

from bench.chaos import FAULTS, ChaosConfig, run_chaos, same, write_report

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_minute_of_faults_loses_nothing_and_answers_right(tmp_path) -> None:
    # One reference run (the comparison's own test is below; `make chaos` runs two).
    report = run_chaos(ChaosConfig(duration_s=60, workers=2, seed=0, reference_runs=1))
    md, js = write_report(report, tmp_path)
    print(md.read_text())
    assert report.problems == [], report.problems
    assert (report.lost, report.wrong, report.duplicated) == (0, 0, 0)
    struck = {kind for kind, count in report.faults.items() if count}
    # The state directory is a tmpfs only where mounting is allowed; every other kind always strikes.
    assert struck >= set(FAULTS) - set(report.skipped_faults), (report.faults, report.skipped_faults)
    assert set(FAULTS) - {"fill-state-dir"} <= struck
    assert report.accepted >= 20 and report.outcomes.get("succeeded", 0) >= 10, report.outcomes
    assert sum(report.outcomes.values()) == report.accepted
    assert json.loads(js.read_text())["clean"] is True


def test_the_comparison_sees_real_differences_and_ignores_how_a_result_was_computed() -> None:
    item = {"input_index": 0, "helpful": [{"train_index": 3, "score": -0.25}], "diagnostics": {"seconds": {"s": 1.0}}}
    assert same(item, {**item, "diagnostics": {"seconds": {"s": 9.0}, "cached": True}})
    assert same(item, {**item, "helpful": [{"train_index": 3, "score": -0.25 * (1 + 5e-5)}]})
    assert not same(item, {**item, "helpful": [{"train_index": 3, "score": -0.25 * (1 + 5e-4)}]})
    assert not same(item, {**item, "helpful": [{"train_index": 4, "score": -0.25}]})
    assert not same(item, {**item, "helpful": []})
    assert not same([item], [item, item])
    assert not same(item, {k: v for k, v in item.items() if k != "helpful"})
