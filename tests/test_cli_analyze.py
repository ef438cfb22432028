"""``fastif analyze`` as a user runs it: a separate process, JSON on stdout, one-line errors on stderr.

The processes start together (each imports torch for a few seconds) and are awaited by the tests;
further error cases run in-process through typer's CliRunner, which also shows any exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig, Query
from tiny import LABELS, make_tiny_family, sentences, single_thread, write_jsonl

NUM_TRAIN = 30
TEXTS = ["the film was superb and warm", "boring and sad story"]
LABELS_GIVEN = ["positive", "0"]
SOLVER = {"damp": 0.1, "scale": 200.0, "depth": 30, "batch_size": 2, "seed": 3}
LISSA = LissaConfig(**SOLVER)


def analyze_argv(model, train, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "fastif_cli.main", "analyze", "--model", str(model), "--train", str(train), "--device", "cpu",
            "--solver", "lissa", "--curvature", "hessian",
            "--damp", str(SOLVER["damp"]), "--scale", str(SOLVER["scale"]), "--depth", str(SOLVER["depth"]),
            "--batch-size", str(SOLVER["batch_size"]), "--seed", str(SOLVER["seed"])]
    return argv + list(extra)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_family(root / "model", "bert", seed=6, initializer_range=0.3)
    train = write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=12, noise=0.1))
    return root, model, train


@pytest.fixture(scope="module")
def runs(files):
    """Every CLI run of this file, started at once; name -> CompletedProcess."""
    root, model, train = files
    inputs = [arg for text, label in zip(TEXTS, LABELS_GIVEN) for arg in ("--text", text, "--label", label)]
    commands = {
        "all": analyze_argv(model, train, *inputs, "--k", "0", "--top", "3", "--json"),
        "k5": analyze_argv(model, train, "--text", TEXTS[0], "--k", "5", "--json"),
        "missing-train": analyze_argv(model, root / "absent.jsonl", "--text", TEXTS[0]),
        "bad-solver": analyze_argv(model, train, "--text", TEXTS[0], "--solver", "newton"),
        "label-count": analyze_argv(model, train, "--text", TEXTS[0], "--text", TEXTS[1], "--label", "positive"),
    }
    # one thread each: the processes share the machine's cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for name, argv in commands.items()}
    done = {}
    try:
        for name, proc in started.items():
            stdout, stderr = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
    return done


@pytest.fixture(scope="module")
def engine(files):
    _, model, train = files
    with single_thread():
        engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(), device="cpu")
        engine.prepare()
    return engine


def test_json_has_every_input_and_every_candidate(runs):
    run = runs["all"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    result = json.loads(run.stdout)  # exactly one JSON document on stdout
    assert list(result) == ["inputs"] and len(result["inputs"]) == len(TEXTS)
    for item, given in zip(result["inputs"], ("positive", "negative")):
        assert {"prediction", "label_used", "helpful", "harmful", "scores"} <= set(item)
        assert item["label_used"] == given
        assert item["prediction"]["label"] in LABELS
        assert sum(item["prediction"]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sorted(s["train_index"] for s in item["scores"]) == list(range(NUM_TRAIN))  # k=0: every example
        scores = {s["train_index"]: s["score"] for s in item["scores"]}
        # helpful: the most negative scores, most helpful first; harmful: the most positive
        negatives = sorted((v, i) for i, v in scores.items() if v < 0)[:3]
        positives = sorted(((v, i) for i, v in scores.items() if v > 0), reverse=True)[:3]
        assert [(e["score"], e["train_index"]) for e in item["helpful"]] == negatives
        assert [(e["score"], e["train_index"]) for e in item["harmful"]] == positives
        assert len(item["helpful"]) + len(item["harmful"]) > 0
        for example in item["helpful"] + item["harmful"]:
            assert example["text"] and example["label"] in LABELS


def test_json_scores_equal_the_engine_in_process(runs, engine):
    result = json.loads(runs["all"].stdout)
    with single_thread():
        _, influences = engine.analyze([Query(t, label=l) for t, l in zip(TEXTS, ("positive", 0))], k=0, solver=LISSA)
    for item, influence in zip(result["inputs"], influences):
        cli = np.array([s["score"] for s in sorted(item["scores"], key=lambda s: s["train_index"])])
        ours = influence.scores[np.argsort(influence.indices)]
        assert np.abs(ours).max() > 1e-4
        np.testing.assert_allclose(cli, ours, rtol=1e-5, atol=1e-7 * np.abs(ours).max())
        assert item["diagnostics"]["s_test_norm"] == pytest.approx(influence.s_test_norm, rel=1e-5)


def test_k_limits_the_scores_to_the_nearest_candidates(runs, engine):
    run = runs["k5"]
    assert run.returncode == 0, run.stderr
    item = json.loads(run.stdout)["inputs"][0]
    assert len(item["scores"]) == 5
    with single_thread():
        query = engine.encode([Query(TEXTS[0])]).search(0)
    nearest = engine.candidates(query, 5).indices.tolist()
    assert [s["train_index"] for s in item["scores"]] == nearest
    assert all(e["knn_distance"] is not None for e in item["helpful"] + item["harmful"])


@pytest.mark.parametrize("name, message", [
    ("missing-train", "absent.jsonl: no such file"),
    ("bad-solver", "--solver must be one of lissa, cg, ekfac, kfac, identity"),
    ("label-count", "--label given 1 times for 2 --text inputs"),
])
def test_errors_are_one_line_without_traceback(runs, name, message):
    run = runs[name]
    assert_one_line_error(run.returncode, run.stdout, run.stderr, message)


def assert_one_line_error(code: int, stdout: str, stderr: str, message: str) -> None:
    assert code != 0
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastif: error: ")
    assert message in lines[0]
    assert "Traceback" not in stderr


def invoke(files, *extra: str):
    from typer.testing import CliRunner

    from fastif_cli.main import app

    _, model, train = files
    with single_thread():
        return CliRunner().invoke(app, analyze_argv(model, train, *extra)[3:])


@pytest.mark.parametrize("extra, message", [
    (("--label", "neutral"), "unknown label 'neutral'"),
    (("--damp", "0"), "damp must be in (0, 1)"),
    (("--params", "bert.nowhere"), "'bert.nowhere'"),
    (("--k", "-1"), "--k must be >= 0"),
    (("--scale", "0.05", "--depth", "300"), "raise 'scale'"),
    (("--inverse-rank-tolerance", "1.5"), "inverse_rank_tolerance must be in [0, 1)"),
])
def test_more_errors_in_process(files, extra, message):
    result = invoke(files, "--text", TEXTS[0], *extra)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, message)


def test_default_solver_is_ekfac_on_the_gauss_newton_matrix(files, engine):
    """Without solver flags: EK-FAC, each block's λ 10 × its mean eigenvalue, the same scores as the engine in process."""
    from typer.testing import CliRunner

    from fastif.config import SolverConfig
    from fastif_cli.main import app

    _, model, train = files
    with single_thread():
        result = CliRunner().invoke(app, ["analyze", "--model", str(model), "--train", str(train), "--device", "cpu",
                                          "--text", TEXTS[0], "--k", "0", "--json"])
        assert result.exit_code == 0, result.output
        item = json.loads(result.stdout)["inputs"][0]
        assert item["diagnostics"]["solver"] == "ekfac" and item["diagnostics"]["curvature"] == "gauss-newton"
        assert (item["diagnostics"]["damping_scope"], item["diagnostics"]["damping_ratio"]) == ("block", 10.0)
        # the per-block λ's mean over the parameters is 10 × the fitted trace over the parameters
        factors = engine.factors()
        assert item["diagnostics"]["damping"] == pytest.approx(10.0 * factors.trace() / factors.num_params, rel=1e-4)
        _, influences = engine.analyze([Query(TEXTS[0])], k=0, solver=SolverConfig())
    cli = np.array([s["score"] for s in sorted(item["scores"], key=lambda s: s["train_index"])])
    np.testing.assert_allclose(cli, influences[0].scores[np.argsort(influences[0].indices)], rtol=1e-5,
                               atol=1e-7 * np.abs(cli).max())


def test_a_solver_that_did_not_converge_says_so_on_stderr(files):
    result = invoke(files, "--text", TEXTS[0], "--k", "5", "--depth", "3", "--json")
    assert result.exit_code == 0, result.output
    assert "did not converge" in result.stderr and "solver lissa" in result.stderr
    assert json.loads(result.stdout)["inputs"][0]["diagnostics"]["converged"] is False


@pytest.mark.parametrize("extra, message", [
    (("--solver", "ekfac", "--curvature", "hessian"), "Gauss-Newton"),
    (("--curvature", "fisher"), "--curvature must be one of gauss-newton, hessian"),
])
def test_bad_curvature_choices(files, extra, message):
    from typer.testing import CliRunner

    from fastif_cli.main import app

    _, model, train = files
    with single_thread():
        result = CliRunner().invoke(app, ["analyze", "--model", str(model), "--train", str(train), "--device", "cpu",
                                          "--text", TEXTS[0], *extra])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, message)


def test_table_output_without_json(files):
    result = invoke(files, "--text", TEXTS[0], "--k", "5", "--top", "2")
    assert result.exit_code == 0, result.output
    assert "most helpful" in result.stdout and "most harmful" in result.stdout and "input 0" in result.stdout


@pytest.mark.parametrize("extra, environ, cores, expected", [
    (("--threads", "3"), {"FASTIF_TORCH_THREADS": "2"}, 5, 3),  # the option first
    ((), {"FASTIF_TORCH_THREADS": "2"}, 5, 2),  # then the variable
    ((), {}, 5, 5),  # else every core the process may use: it has the machine to itself
])
def test_threads_option_sets_torch_threads(files, monkeypatch, extra, environ, cores, expected):
    """What torch runs on when the engine starts; the engine is stopped there by a FastIFError."""
    import torch
    from typer.testing import CliRunner

    from fastif import FastIFError, InfluenceEngine
    from fastif_cli.main import app

    seen = []

    def record_threads(*_args, **_kwargs):
        seen.append(torch.get_num_threads())
        raise FastIFError("stopped after the threads were set")

    monkeypatch.setattr(InfluenceEngine, "from_paths", record_threads)
    monkeypatch.setattr("fastif.threads.available_cores", lambda: cores)
    for name in ("FASTIF_TORCH_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    _, model, train = files
    with single_thread():
        result = CliRunner().invoke(app, ["analyze", "--model", str(model), "--train", str(train), "--device", "cpu",
                                          "--text", TEXTS[0], *extra])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "stopped after the threads were set")
    assert seen == [expected]


@pytest.mark.parametrize("extra, environ, message", [
    (("--threads", "0"), {}, "--threads must be at least 1, not 0"),
    ((), {"FASTIF_TORCH_THREADS": "two"}, "FASTIF_TORCH_THREADS must be a whole number >= 1, got 'two'"),
])
def test_bad_thread_counts_are_one_line_errors(files, monkeypatch, extra, environ, message):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    result = invoke(files, "--text", TEXTS[0], *extra)
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, message)
