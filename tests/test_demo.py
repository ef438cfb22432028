"""``fastif demo --quick``: the README's main job end to end on a tiny model, against the real stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from fastif_cli.demo_data import make_demo_data

pytestmark = pytest.mark.integration


def test_demo_pipeline_prints_explanations_and_the_mislabel_count(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("REDIS_URL", None)  # the demo brings its own embedded Redis
    done = subprocess.run([sys.executable, "-m", "fastif_cli.main", "demo", "--quick", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    data = make_demo_data(count=400)
    assert "fine-tuned a tiny random BERT on 400 reviews" in out
    assert "ready: 400 training examples indexed" in out
    for test in data.test:
        assert test["text"] in out
    predictions = re.findall(r"predicted (negative|positive) \((\d\.\d\d)\), true label (negative|positive): (right|wrong)", out)
    assert len(predictions) == len(data.test)
    assert all((pred == truth) == (verdict == "right") for pred, _, truth, verdict in predictions)
    assert out.count("helpful") >= len(data.test) and out.count("harmful") >= len(data.test)
    summary = json.loads((tmp_path / "summary.json").read_text())
    wrong = sum(verdict == "wrong" for *_, verdict in predictions)
    assert f"summary: {wrong} of {len(data.test)} test inputs predicted wrong" in out
    assert summary["wrong_predictions"] == wrong and summary["inputs"] == len(data.test)
    line = re.search(r"planted mislabels among the (\d+) most harmful training examples: (\d+) \(random choice\s+would find ([\d.]+)\)", out)
    assert line, out[-2000:]
    harmful, found, expected = int(line[1]), int(line[2]), float(line[3])
    assert (harmful, found) == (summary["harmful_examples"], summary["planted_mislabels_found"])
    assert expected == pytest.approx(harmful * len(data.mislabelled) / 400, abs=0.05)
    # A second run reuses the fine-tuned model instead of training again.
    again = subprocess.run([sys.executable, "-m", "fastif_cli.main", "demo", "--quick", "--workdir", str(tmp_path)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "reusing the fine-tuned classifier" in again.stdout
