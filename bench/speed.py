"""``speed``: one query, four ways, on the same model, data and test input.

(a) the original influence functions: every training example scored by a
    per-example autograd loop, s_test by LiSSA with B = 128, J = 1000, all through
    the whole model (``bench.reference``);
(b) FastIF's configuration as FastIF's reference code runs it: kNN k = 1000,
    LiSSA B = 1, J = 1000, double-backward HVPs and per-example gradients through
    the whole model;
(c) this engine at (b)'s configuration, and (c') the same with its H·v compiled by
    torch.compile (``compile_hvp``; the one-time compilation is timed apart, like
    the index build);
(d) this engine at its best configuration (the ``stest`` suite's finding).

(c) and (d) are run in full and timed end to end. (a) and (b) take minutes to
hours on a CPU, so their per-step and per-example costs are measured on a sample
and multiplied out (every LiSSA step and every candidate is the same work). Their
quality: (b) runs exactly the algorithm of (c) on the same samples, so the sample
is also used to check that the reference and the engine give the same numbers, and
(b)'s scores are (c)'s; (a)'s scores are the exact (H + λI)⁻¹ solution (conjugate
gradient over all N training examples, the value LiSSA at B = 128, J = 1000
estimates), scored on the shared kNN candidates.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fastif import LissaConfig, Query, SolverConfig

from .common import (Clock, bars, engine_progress, headline_block, rel_diff, setup_block, spearman, table, top_overlap,
                     write_results)
from .data import read_rows
from .exact import cached_cg
from .reference import FastIFReference


ROUNDS = 2


@dataclass(frozen=True)
class SpeedConfig:
    k: int
    fastif: LissaConfig  # (b) and (c)
    original_batch: int  # (a)
    original_depth: int
    sample_original_steps: int
    sample_original_examples: int
    sample_reference_steps: int
    sample_reference_candidates: int
    fallback_best: LissaConfig
    cg_tol: float = 1e-3  # the stest suite's too: the CG solution of the shared input is reused from runs/bench/cg-cache


DEFAULT = SpeedConfig(k=1000, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=1000, batch_size=1), original_batch=128,
                      original_depth=1000, sample_original_steps=2, sample_original_examples=100,
                      sample_reference_steps=200, sample_reference_candidates=200,
                      fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=100, batch_size=4))
QUICK = SpeedConfig(k=60, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=200, batch_size=1), original_batch=128,
                    original_depth=1000, sample_original_steps=2, sample_original_examples=20,
                    sample_reference_steps=200, sample_reference_candidates=60,
                    fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=20, batch_size=4))


def best_from_stest(out: Path, fallback: LissaConfig) -> tuple[LissaConfig, str]:
    """The stest suite's chosen configuration (from ``out/stest.json``), else the fallback."""
    path = out / "stest.json"
    if path.is_file():
        try:
            best = json.loads(path.read_text())["best"]
            config = replace(fallback, depth=int(best["J"]), batch_size=int(best["B"]), repeats=int(best["T"]))
            reached = "reached" if best.get("reached_threshold") else "did NOT reach"
            return config, (f"from {path.name}: the fastest configuration that {reached} 0.95 Spearman with CG "
                            f"({best['spearman_mean']:.3f})")
        except (KeyError, ValueError, TypeError):
            pass
    return fallback, f"{path.name} not found: a default configuration (run `fastif bench stest` first)"


def _run_engine(engine, query: Query, lissa: LissaConfig, k: int) -> dict:
    """One query through the engine's steps, timed end to end (gradients, s_test, kNN, scoring)."""
    clock = Clock()
    plan = engine.plan([query])
    s_tests, diagnostics, cached, factors = engine.cached_s_test(plan, lissa)
    influence = engine.influences(plan, s_tests, k, diagnostics, cached, factors=factors)[0]
    converged = bool(diagnostics["converged"])
    seconds = clock.seconds
    return {"seconds": seconds, "stages": {k: float(v) for k, v in influence.seconds.items()},
            "indices": influence.indices, "scores": influence.scores, "s_test": s_tests[0], "plan": plan,
            "converged": converged}


def run(setup, out: Path, config: SpeedConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    best, best_note = best_from_stest(out, config.fallback_best)
    train_rows = read_rows(setup.train_path)
    row = setup.test_rows[0]
    query = Query(row.text, label=row.label)
    damping = config.fastif.damping
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        if len(train_rows) != engine.num_train:
            raise RuntimeError(f"{setup.train_path}: {len(train_rows)} rows read here, {engine.num_train} by the engine")
        n, k = engine.num_train, min(config.k, engine.num_train)
        # Warm-up: first-call allocations and forward-mode set-up stay out of the timings.
        engine.analyze([query], k=10, solver=replace(config.fastif, depth=2))
        # (e), the service's default: its spectrum and EK-FAC factors are fitted once per model at build time.
        fit_clock = Clock()
        engine.spectrum("gauss-newton")
        engine.factors()
        fit_seconds = fit_clock.seconds
        engine.analyze([query], k=10, solver=SolverConfig())
        task = progress.add_task("(c') compiling the engine's H·v (once)", total=None)
        compiled = setup.engine(compile_hvp=True)
        compile_clock = Clock()
        compiled.analyze([query], k=10, solver=replace(config.fastif, depth=2))
        compile_seconds = compile_clock.seconds
        progress.update(task, total=1, completed=1)

        # Exact scores for (a) on the shared candidates.
        candidates = engine.candidates(engine.plan([query]).search[0], k).indices
        task = progress.add_task("(a) exact s_test: CG, full Hessian", total=None)
        vector = engine.plan([query]).vectors
        exact, cg_info = cached_cg(engine, setup.workdir / "cg-cache", [f"{row.text}|{row.label}"], vector, damping,
                                   tol=config.cg_tol)
        progress.update(task, total=1, completed=1)
        scores_a = engine.score(exact[0], candidates)

        reference = FastIFReference(setup.model_dir, engine.names, setup.max_length)
        v = [g for g in reference.test_gradient(row, row.label)]
        grad_clock = Clock()
        for _ in range(3):
            reference.test_gradient(row, row.label)
        t_test_grad = grad_clock.seconds / 3
        knn_clock = Clock()
        reference.predict(row)
        engine.candidates(engine.encode([query]).search(0), k)
        t_knn = knn_clock.seconds

        # Other processes may share the cores and their load drifts: the engine runs and the reference's samples
        # alternate over ROUNDS rounds, so that every way is timed across the same stretch of time.
        steps_b = min(config.sample_reference_steps, config.fastif.depth)
        cands_b = min(config.sample_reference_candidates, len(candidates))
        b_full = steps_b >= config.fastif.depth and cands_b >= len(candidates)
        rounds = 1 if b_full else ROUNDS
        examples_a = min(config.sample_original_examples, n)
        sample_a = random.Random(0).sample(range(n), examples_a)
        runs_c, runs_compiled, runs_d, runs_e = [], [], [], []
        step_b_time = cand_time = step_a_time = example_time = 0.0
        steps_b_done = cands_done = steps_a_done = examples_done = 0
        for r in range(rounds):
            task = progress.add_task(f"round {r + 1}/{rounds}: (c) engine, FastIF config", total=1)
            runs_c.append(_run_engine(engine, query, config.fastif, k))
            progress.update(task, completed=1)
            task = progress.add_task(f"round {r + 1}/{rounds}: (c') engine, FastIF config, compiled H·v", total=1)
            runs_compiled.append(_run_engine(compiled, query, config.fastif, k))
            progress.update(task, completed=1)
            task = progress.add_task(f"round {r + 1}/{rounds}: (d) engine, best config", total=1)
            runs_d.append(_run_engine(engine, query, best, k))
            progress.update(task, completed=1)
            task = progress.add_task(f"round {r + 1}/{rounds}: (e) engine, the service's default (EK-FAC)", total=1)
            runs_e.append(_run_engine(engine, query, SolverConfig(), k))
            progress.update(task, completed=1)

            # (b): LiSSA at B = 1 on the engine's sampling stream (from its start), then per-candidate gradients.
            steps = steps_b // rounds
            task = progress.add_task(f"round {r + 1}/{rounds}: (b) reference LiSSA B=1, {steps} steps", total=steps)
            clock_b = Clock()
            s_ref, _ = reference.s_test(v, train_rows, steps, 1, config.fastif.damp, config.fastif.scale,
                                        seed=config.fastif.seed, on_step=lambda done, t=task: progress.update(t, completed=done))
            step_b_time, steps_b_done = step_b_time + clock_b.seconds, steps_b_done + steps
            if r == 0:
                engine_partial = (engine.solve(runs_c[0]["plan"].vectors, replace(config.fastif, depth=steps)).vectors[0]
                                  if not b_full else runs_c[0]["s_test"])
                lissa_check = rel_diff(reference.flat(s_ref), engine_partial)
                check_steps = steps
            chunk = list(candidates[r * cands_b // rounds:(r + 1) * cands_b // rounds])
            task = progress.add_task(f"round {r + 1}/{rounds}: (b) reference scoring, {len(chunk)} candidates", total=len(chunk))
            s_for_scoring = s_ref if b_full else reference.unflat(runs_c[0]["s_test"])
            clock_b = Clock()
            sample_scores = reference.influences(s_for_scoring, [train_rows[i] for i in chunk],
                                                 on_step=lambda done, t=task: progress.update(t, completed=done))
            cand_time, cands_done = cand_time + clock_b.seconds, cands_done + len(chunk)
            if r == 0:
                scoring_check = rel_diff(sample_scores, runs_c[0]["scores"][:len(chunk)])
                scores_b = sample_scores if b_full else runs_c[0]["scores"]

            # (a): LiSSA at B = 128 and the per-example loop over all N, both sampled.
            steps = config.sample_original_steps
            task = progress.add_task(f"round {r + 1}/{rounds}: (a) reference LiSSA B={config.original_batch}, {steps} steps",
                                     total=steps)
            clock_a = Clock()
            reference.s_test(v, train_rows, steps, config.original_batch, config.fastif.damp, config.fastif.scale,
                             seed=7 + r, on_step=lambda done, t=task: progress.update(t, completed=done))
            step_a_time, steps_a_done = step_a_time + clock_a.seconds, steps_a_done + steps
            chunk = sample_a[r * examples_a // rounds:(r + 1) * examples_a // rounds]
            task = progress.add_task(f"round {r + 1}/{rounds}: (a) reference loop, {len(chunk)} of {n}", total=len(chunk))
            clock_a = Clock()
            reference.influences(reference.unflat(exact[0]), [train_rows[i] for i in chunk],
                                 on_step=lambda done, t=task: progress.update(t, completed=done))
            example_time, examples_done = example_time + clock_a.seconds, examples_done + len(chunk)

    c, cc, d = runs_c[0], runs_compiled[0], runs_d[0]
    c_seconds, d_seconds = [x["seconds"] for x in runs_c], [x["seconds"] for x in runs_d]
    cc_seconds = [x["seconds"] for x in runs_compiled]
    step_b, step_a = step_b_time / steps_b_done, step_a_time / steps_a_done
    # One training example's reference gradient and dot product is the same work in (a)'s loop and (b)'s scoring.
    per_example = (cand_time + example_time) / (cands_done + examples_done)
    cand_b = example_a = per_example
    steps_b, cands_b, steps_a, examples_a = steps_b_done, cands_done, steps_a_done, examples_done
    t_a = t_test_grad + config.original_depth * step_a + n * example_a
    t_b = t_test_grad + t_knn + config.fastif.depth * config.fastif.repeats * step_b + len(candidates) * cand_b
    t_c, t_cc, t_d = float(np.mean(c_seconds)), float(np.mean(cc_seconds)), float(np.mean(d_seconds))
    e_seconds = [x["seconds"] for x in runs_e]
    t_e = float(np.mean(e_seconds))

    def quality(scores) -> dict:
        return {"spearman": spearman(scores, scores_a), "top10_helpful": top_overlap(scores_a, scores, 10),
                "top10_harmful": top_overlap(scores_a, scores, 10, harmful=True)}

    qualities = {"b": quality(scores_b), "c": quality(c["scores"]), "c_compiled": quality(cc["scores"]),
                 "d": quality(d["scores"])}
    headline = {"speedup_c_vs_b": round(t_b / t_c, 2), "speedup_d_vs_a": round(t_a / t_d, 1),
                "spearman_d_vs_a": round(qualities["d"]["spearman"], 4),
                "speedup_c_compiled_vs_b": round(t_b / t_cc, 2), "speedup_default_vs_b": round(t_b / t_e, 1),
                "query_seconds_default": round(t_e, 3)}
    data = {
        "config": {**asdict(config), "fastif": asdict(config.fastif), "fallback_best": asdict(config.fallback_best)},
        "best": asdict(best), "best_note": best_note, "num_train": n, "k": len(candidates), "damping": damping,
        "seconds": {"a": t_a, "b": t_b, "c": t_c, "c_compiled": t_cc, "d": t_d, "e": t_e}, "runs_c_seconds": c_seconds,
        "runs_e_seconds": e_seconds, "default_fit_seconds": fit_seconds, "e_stages": runs_e[0]["stages"],
        "runs_c_compiled_seconds": cc_seconds, "runs_d_seconds": d_seconds, "compile_seconds": compile_seconds,
        "compiled_hvp_used": bool(compiled.objective.compiled and compiled.objective.compiled.usable),
        "rounds": rounds,
        "measured": {"a": False, "b": b_full, "c": True, "d": True},
        "speedups": {"e_vs_b": t_b / t_e, "e_vs_a": t_a / t_e, "c_vs_b": t_b / t_c, "c_compiled_vs_b": t_b / t_cc, "d_vs_a": t_a / t_d, "d_vs_b": t_b / t_d,
                     "c_vs_a": t_a / t_c, "b_vs_a": t_a / t_b},
        "quality_vs_a": qualities,
        "parts": {"test_gradient_reference": t_test_grad, "knn_reference": t_knn,
                  "a_seconds_per_lissa_step_b128": step_a, "a_seconds_per_example": example_a,
                  "a_samples": {"lissa_steps": steps_a, "examples": examples_a},
                  "b_seconds_per_lissa_step_b1": step_b, "b_seconds_per_candidate": cand_b,
                  "reference_seconds_per_example_measured": {"b_candidates": cand_time / max(1, cands_done),
                                                             "a_examples": example_time / max(1, examples_done)},
                  "check_steps": check_steps,
                  "b_samples": {"lissa_steps": steps_b, "candidates": cands_b},
                  "c_stages": c["stages"], "c_compiled_stages": cc["stages"], "d_stages": d["stages"]},
        "checks": {"reference_vs_engine_s_test_rel_diff": lissa_check, "s_test_check_steps": check_steps,
                   "reference_vs_engine_scores_rel_diff": scoring_check,
                   "c_lissa_converged": c["converged"], "d_lissa_converged": d["converged"]},
        "cg": cg_info, "suite_seconds": clock.seconds,
    }
    write_results(out, "speed", headline, data, _markdown(setup, config, best, headline, data))
    return headline


def _markdown(setup, config, best, headline, data) -> str:
    s, q, p, m = data["seconds"], data["quality_vs_a"], data["parts"], data["measured"]
    fastif = config.fastif
    rows = [
        ("(a) original IF", f"all N = {data['num_train']:,}", f"B={config.original_batch}, J={config.original_depth}",
         s["a"], "extrapolated", 1.0, 1.0, 1.0, 1.0),
        ("(b) FastIF reference code", f"kNN k = {data['k']}", f"B={fastif.batch_size}, J={fastif.depth}", s["b"],
         "measured" if m["b"] else "extrapolated", s["a"] / s["b"], q["b"]["spearman"], q["b"]["top10_helpful"],
         q["b"]["top10_harmful"]),
        ("(c) this engine, FastIF config", f"kNN k = {data['k']}", f"B={fastif.batch_size}, J={fastif.depth}", s["c"],
         "measured", s["a"] / s["c"], q["c"]["spearman"], q["c"]["top10_helpful"], q["c"]["top10_harmful"]),
        ("(c') the same, H·v compiled", f"kNN k = {data['k']}", f"B={fastif.batch_size}, J={fastif.depth}", s["c_compiled"],
         "measured", s["a"] / s["c_compiled"], q["c_compiled"]["spearman"], q["c_compiled"]["top10_helpful"],
         q["c_compiled"]["top10_harmful"]),
        ("(d) this engine, best config", f"kNN k = {data['k']}", f"B={best.batch_size}, J={best.depth}, T={best.repeats}",
         s["d"], "measured", s["a"] / s["d"], q["d"]["spearman"], q["d"]["top10_helpful"], q["d"]["top10_harmful"]),
        ("(e) this engine, the service's default", f"kNN k = {data['k']}", "EK-FAC, Gauss-Newton, λ per block 10 × its mean eig.",
         s["e"], "measured", s["a"] / s["e"], "—", "—", "—"),
    ]
    checks = data["checks"]
    c_st, d_st = p["c_stages"], p["d_stages"]
    b_note = ("(b) was run in full" if m["b"] else
              f"(b)'s scores are (c)'s: the same algorithm on the same samples. On the sample the reference and the engine "
              f"agree: s_test after {checks['s_test_check_steps']} steps to a relative difference of "
              f"{checks['reference_vs_engine_s_test_rel_diff']:.1e}, and the scores of the first sampled candidates to "
              f"{checks['reference_vs_engine_scores_rel_diff']:.1e}")
    measured_each = p["reference_seconds_per_example_measured"]
    return f"""# speed: one query, the original influence functions against FastIF and this engine

{headline_block(headline)}

The service's default query (e) vs FastIF's reference code at its own configuration (b):
**{data['speedups']['e_vs_b']:,.0f}×** (goal ≥ 100×); its EK-FAC factors and spectrum were fitted once before,
in {data['default_fit_seconds']:.0f} s (at build time in the service), and its stages were
{', '.join(f"{k} {v:.2f} s" for k, v in data['e_stages'].items())}. (e) solves a different system than (a)–(d)
(the Gauss-Newton matrix at a damping relative to its spectrum, not the Hessian at λ = 50), so its agreement with
(a) says nothing of its quality: `fastif bench lds` measures that against retraining.

Speed-ups: (c) vs (b) **{data['speedups']['c_vs_b']:.1f}×** (goal ≥ 10×), with the H·v compiled (c') vs (b)
**{data['speedups']['c_compiled_vs_b']:.1f}×**; (d) vs (a) **{data['speedups']['d_vs_a']:,.0f}×**
at Spearman {q['d']['spearman']:.3f} (goal ≥ 500× at ≥ 0.9); (d) vs (b) {data['speedups']['d_vs_b']:.1f}×; (c) vs (a)
{data['speedups']['c_vs_a']:,.0f}×.

## Set-up
{setup_block(setup, [
    f"- one query: the first test input, with its gold label; damp {fastif.damp}, scale {fastif.scale:g} (λ = {data['damping']:g})",
    f"- (d)'s configuration {data['best_note']}",
    "- quality: Spearman and top-10 overlap (most helpful / most harmful) against (a) on the shared kNN candidates. "
    f"(a)'s scores there are exact: conjugate gradient on (H + λI) over all N training examples to relative residual "
    f"{config.cg_tol:g} — the value that (a)'s LiSSA (B = {config.original_batch}, J = {config.original_depth}) estimates",
    f"- timing: {data['rounds']} round(s), each running (c) and (d) in full and then a share of every reference sample, so "
    f"that load from other processes falls on all four alike; (c) and (d) are the means of their runs "
    f"({', '.join(f'{x:.1f}' for x in data['runs_c_seconds'])} s and {', '.join(f'{x:.2f}' for x in data['runs_d_seconds'])} s)",
    f"- one training example's reference gradient and dot product is the same work in (a)'s loop and (b)'s scoring: "
    f"its cost is pooled over both samples ({measured_each['b_candidates'] * 1000:.1f} ms on (b)'s candidates, "
    f"{measured_each['a_examples'] * 1000:.1f} ms on (a)'s random examples)",
    f"- (a) extrapolated: {p['a_samples']['lissa_steps']} reference LiSSA steps at B = {config.original_batch} "
    f"({p['a_seconds_per_lissa_step_b128']:.2f} s each) × {config.original_depth}, plus {p['a_samples']['examples']} sampled "
    f"training examples of the per-example loop ({p['a_seconds_per_example'] * 1000:.1f} ms each) × N = {data['num_train']:,}, "
    f"plus the test gradient ({p['test_gradient_reference'] * 1000:.1f} ms)",
    f"- (b) {'measured in full' if m['b'] else 'extrapolated'}: reference LiSSA step at B = 1 "
    f"{p['b_seconds_per_lissa_step_b1'] * 1000:.1f} ms (timed over {p['b_samples']['lissa_steps']} steps) × {fastif.depth}, "
    f"plus per-candidate gradient and dot product {p['b_seconds_per_candidate'] * 1000:.1f} ms (timed over "
    f"{p['b_samples']['candidates']}) × {data['k']}, plus the test gradient and the kNN query",
    f"- {b_note}",
    f"- (c') is (c) with `compile_hvp`: the engine's H·v compiled by torch.compile (fastif/compiled.py); compiling "
    f"took {data['compile_seconds']:.1f} s once before the timed runs (per process, model and batch shape, like the index "
    f"build), and the compiled product {'was' if data['compiled_hvp_used'] else 'was NOT (it fell back to eager)'} used; "
    f"its runs: {', '.join(f'{x:.1f}' for x in data['runs_c_compiled_seconds'])} s",
    f"- (c) stages: {', '.join(f'{k} {v:.2f} s' for k, v in c_st.items())}; (d) stages: "
    f"{', '.join(f'{k} {v:.2f} s' for k, v in d_st.items())} (the one-time features, prefix cache and faiss index are "
    "built before, as FastIF builds its index before querying)",
])}

## Results

{table(["", "scored", "LiSSA", "seconds", "how", "speed-up vs (a)", "Spearman vs (a)", "top-10 helpful", "top-10 harmful"], rows)}
"""
