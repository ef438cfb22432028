"""Smoke test of ``fastif bench``: every suite with ``--quick`` (tiny random model, toy data) through the CLI.

The suites run in the order the real benchmarks do (stest first: speed, batch and
service read its chosen configuration from the same results folder).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEADLINES = {
    "stest": ("best_config", "best_seconds"),
    "recall": ("recall_at_1000_top10", "recall_at_1000_top10_feature_knn"),
    "speed": ("speedup_c_vs_b", "speedup_d_vs_a", "spearman_d_vs_a", "speedup_c_compiled_vs_b"),
    "batch": ("per_input_cost_ratio_32_vs_1", "dataset_inputs_per_s", "dataset_speedup_2_vs_1_workers"),
    "service": ("cached_p50_ms", "throughput_ratio_2_vs_1_workers", "poll_p99_ms"),
    "lds": ("lds_default", "lds_fastif_paper_config", "lds_graddot", "query_seconds_default", "retraining_noise"),
}
PLOTS = {"stest": "stest.png", "recall": "recall.png"}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def run_bench(suite: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastif_cli.main", "bench", suite, "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("suite", [
    # batch and service start real stacks (a dataset job; jobs over HTTP).
    "stest", "recall", "speed", pytest.param("batch", marks=pytest.mark.integration), "lds",
    pytest.param("service", marks=pytest.mark.integration),
])
def test_suite_quick_writes_its_results(suite: str, out: Path) -> None:
    done = run_bench(suite, out)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown, result = out / f"{suite}.md", out / f"{suite}.json"
    assert markdown.is_file() and result.is_file()
    assert markdown.read_text().startswith(f"# {suite}")
    payload = json.loads(result.read_text())
    headline = payload["headline"]
    for key in HEADLINES[suite]:
        assert key in headline, f"{suite}: headline lacks {key}"
        value = headline[key]
        if key == "best_config":
            assert re.fullmatch(r"J=\d+, B=\d+, T=\d+", value), value
        else:
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), (key, value)
    if suite in PLOTS:
        assert (out / PLOTS[suite]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_suite_and_missing_data_are_one_line_errors(tmp_path: Path) -> None:
    done = run_bench("nonsense", tmp_path)
    assert done.returncode == 2 and "unknown suite" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "fastif_cli.main", "bench", "recall", "--data",
                           str(tmp_path / "missing.tsv"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not found" in done.stderr and "Traceback" not in done.stderr


def test_the_scale_suites_large_sets_are_distinct_texts_as_long_as_its_sentences() -> None:
    """Above the sentences there are, ``fastif bench scale`` splices two: as many distinct texts as asked for, of about
    a sentence's length (whole sentences joined doubled it, and with it a query's cost per candidate)."""
    from bench.data import toy_rows
    from bench.scale import training_rows

    sentences = toy_rows(300, seed=1)
    sentences += sentences[:10]  # a data set that repeats a few sentences, as SST-2 does
    assert training_rows(sentences, 200) == training_rows(sentences, 200) and len(training_rows(sentences, 200)) == 200
    rows = training_rows(sentences, 3_000)
    assert len(rows) == len({row.text for row in rows}) == 3_000
    originals = {row.text for row in sentences}
    words = [len(row.text.split()) for row in rows if row.text not in originals]  # the splices
    mean_sentence = sum(len(row.text.split()) for row in sentences) / len(sentences)
    assert abs(sum(words) / len(words) - mean_sentence) <= 0.25 * mean_sentence
