"""``stest``: FastIF's s_test trade-off — LiSSA's depth J, batch B and repeats T against time and accuracy.

For a few test inputs, s_test from a grid of LiSSA configurations is compared with
conjugate gradient on the whole training set's Hessian (same damping λ = damp·scale):
the agreement is the Spearman correlation of the influence scores each gives on
the input's k nearest candidates. The time of a configuration is J·T times the
measured seconds of one LiSSA step at batch B for a single input; the fastest
configuration within the threshold is then run for real and its measured time is
the headline.

How the grid stays affordable: one LiSSA run of depth J_max passes through every
shallower depth with the same samples, so each run (the engine's own ``lissa``
with the engine's HVP) is snapshotted at every checkpoint J; repeats use the
engine's independent sampling streams and are averaged in score space (scores are
linear in s_test); and all inputs of the grid go through each HVP together (rows
of one LiSSA call are independent given the samples).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastif import LissaConfig, LissaDivergedError, Query
from fastif.solvers import lissa

from .common import (Clock, bars, engine_progress, headline_block, log, plot, rel_diff, setup_block, spearman, pearson,
                     table, top_overlap, write_results)
from .exact import cached_cg, gradient_scores


@dataclass(frozen=True)
class StestConfig:
    inputs: int
    k: int
    damp: float
    scale: float
    grid: tuple[tuple[int, int, int], ...]  # (B, J_max, T_max)
    checkpoints: tuple[int, ...]
    timing_steps: int
    cg_tol: float
    threshold: float = 0.95
    seed: int = 0


DEFAULT = StestConfig(inputs=4, k=1000, damp=5e-3, scale=1e4,
                      grid=((1, 1000, 2), (4, 1000, 1), (16, 500, 1), (64, 200, 1)),
                      checkpoints=(10, 25, 50, 100, 200, 300, 500, 1000), timing_steps=30, cg_tol=1e-4)
QUICK = StestConfig(inputs=2, k=60, damp=5e-3, scale=1e4, grid=((1, 50, 2), (4, 50, 1), (16, 25, 1)),
                    checkpoints=(5, 10, 25, 50), timing_steps=5, cg_tol=1e-4)


def snapshot_lissa(engine, vectors: torch.Tensor, batch: int, j_max: int, t_max: int, checkpoints, damp: float,
                   scale: float, seed: int, on_step=None) -> dict[tuple[int, int], torch.Tensor]:
    """s_test after J steps of repeat r, for every checkpoint J ≤ j_max: {(r, J): [m, P]}.

    Runs the engine's ``lissa`` with depth j_max + 1 and reads h where the HVP receives it
    (call J of a repeat sees h after J updates); the extra last step is discarded.
    """
    wanted = {j for j in checkpoints if j <= j_max}
    snaps: dict[tuple[int, int], torch.Tensor] = {}
    calls = 0

    def hvp(indices, h):
        nonlocal calls
        repeat, step = divmod(calls, j_max + 1)
        if step in wanted:
            snaps[(repeat, step)] = h.detach().clone() / scale
        calls += 1
        return engine.hvp(indices, h)

    config = LissaConfig(damp=damp, scale=scale, depth=j_max + 1, batch_size=batch, repeats=t_max, seed=seed)
    lissa(hvp, vectors, engine.num_train, config, on_step)
    return snaps


def step_seconds(engine, vector: torch.Tensor, batch: int, steps: int, damp: float, scale: float) -> float:
    """Measured seconds per LiSSA step at batch B for one input (the engine's solve, end to end)."""
    engine.solve(vector, LissaConfig(damp=damp, scale=scale, depth=2, batch_size=batch, seed=99))  # warm-up
    clock = Clock()
    engine.solve(vector, LissaConfig(damp=damp, scale=scale, depth=steps, batch_size=batch, seed=98))
    return clock.seconds / steps


def run(setup, out: Path, config: StestConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    damping = config.damp * config.scale
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        rows = setup.test_rows[:config.inputs]
        plan = engine.plan([Query(r.text, label=r.label) for r in rows])
        vectors = plan.vectors
        candidates = [engine.candidates(plan.features[i], config.k).indices for i in range(len(rows))]

        task = progress.add_task("CG reference (full Hessian)", total=None)
        cg, cg_info = cached_cg(engine, setup.workdir / "cg-cache", [f"{r.text}|{r.label}" for r in rows], vectors,
                                damping, tol=config.cg_tol,
                                on_iter=lambda it, res: progress.update(task, completed=it, description=f"CG reference: residual {res:.1e}"))
        progress.update(task, total=1, completed=1)

        snapshots: dict[tuple[int, int, int], torch.Tensor] = {}  # (B, repeat, J) -> [m, P]
        diverged: dict[int, str] = {}
        run_seconds: dict[int, float] = {}
        for batch, j_max, t_max in config.grid:
            task = progress.add_task(f"LiSSA grid B={batch} (J≤{j_max}, T≤{t_max})", total=(j_max + 1) * t_max)
            run_clock = Clock()
            try:
                snaps = snapshot_lissa(engine, vectors, batch, j_max, t_max, config.checkpoints, config.damp, config.scale,
                                       config.seed, on_step=lambda done, total, t=task: progress.update(t, completed=done) and False)
            except LissaDivergedError as err:
                diverged[batch] = str(err)
                continue
            run_seconds[batch] = run_clock.seconds
            for (repeat, j), value in snaps.items():
                snapshots[(batch, repeat, j)] = value

        task = progress.add_task("per-step time, one input", total=len(config.grid))
        per_step = {}
        for batch, _, _ in config.grid:
            per_step[batch] = step_seconds(engine, vectors[:1], batch, config.timing_steps, config.damp, config.scale)
            progress.advance(task)

        # Scores on each input's candidates: CG and every snapshot, from each candidate's gradient once.
        keys = sorted(snapshots)
        reference_scores, plain_scores, snapshot_scores = [], [], []
        task = progress.add_task("scoring candidates", total=len(rows) * config.k)
        for i in range(len(rows)):
            directions = torch.stack([cg[i], vectors[i]] + [snapshots[key][i] for key in keys])
            scores = gradient_scores(engine, candidates[i], directions,
                                     on_step=lambda done, base=i * config.k: progress.update(task, completed=base + done))
            reference_scores.append(scores[0].numpy())
            plain_scores.append(scores[1].numpy())
            snapshot_scores.append({key: scores[2 + n].numpy() for n, key in enumerate(keys)})
        jvp_check = rel_diff(engine.score(cg[0], candidates[0]), reference_scores[0])

    results = []
    for batch, j_max, t_max in config.grid:
        if batch in diverged:
            continue
        t_values = [t for t in (1, 2, 4, 8, 16) if t <= t_max]
        for t in t_values:
            for j in sorted(j for j in config.checkpoints if j <= j_max):
                agreement = []
                for i in range(len(rows)):
                    estimate = np.mean([snapshot_scores[i][(batch, r, j)] for r in range(t)], axis=0)
                    agreement.append((spearman(estimate, reference_scores[i]), pearson(estimate, reference_scores[i]),
                                      top_overlap(reference_scores[i], estimate, 10),
                                      top_overlap(reference_scores[i], estimate, 10, harmful=True)))
                a = np.array(agreement)
                results.append({"J": j, "B": batch, "T": t, "seconds": j * t * per_step[batch],
                                "spearman_mean": float(a[:, 0].mean()), "spearman_min": float(a[:, 0].min()),
                                "pearson_mean": float(a[:, 1].mean()), "top10_helpful": float(a[:, 2].mean()),
                                "top10_harmful": float(a[:, 3].mean())})

    # Without any inverse Hessian (s_test ∝ the test gradient): how much LiSSA's curvature changes the ranking.
    baseline = {"spearman_mean": float(np.mean([spearman(p, r) for p, r in zip(plain_scores, reference_scores)])),
                "top10_helpful": float(np.mean([top_overlap(r, p, 10) for p, r in zip(plain_scores, reference_scores)]))}
    good = [r for r in results if r["spearman_mean"] >= config.threshold]
    reached = bool(good)
    best = min(good, key=lambda r: r["seconds"]) if good else max(results, key=lambda r: r["spearman_mean"])
    best_lissa = LissaConfig(damp=config.damp, scale=config.scale, depth=best["J"], batch_size=best["B"], repeats=best["T"],
                             seed=config.seed)
    measure = Clock()
    engine.solve(vectors[:1], best_lissa)
    best_seconds = measure.seconds
    scoring_clock = Clock()
    engine.score(cg[0], candidates[0])
    scoring_seconds = scoring_clock.seconds
    best_name = f"J={best['J']}, B={best['B']}, T={best['T']}"
    headline = {"best_config": best_name, "best_seconds": round(best_seconds, 3)}

    out.mkdir(parents=True, exist_ok=True)
    png = plot(out / "stest.png", lambda ax: _draw(ax, results, config, best))
    data = {
        "config": asdict(config), "damping": damping, "num_train": setup.num_train, "inputs": len(rows),
        "best": {**best, "measured_seconds": best_seconds, "reached_threshold": reached},
        "cg": {**cg_info, "tol": config.cg_tol}, "seconds_per_step_one_input": per_step,
        "grid_run_seconds_all_inputs": run_seconds, "diverged": diverged,
        "scoring_seconds_k_candidates": scoring_seconds, "jvp_vs_gradient_scores_rel_diff": jvp_check,
        "gradient_similarity_baseline": baseline, "results": results, "suite_seconds": clock.seconds,
    }
    write_results(out, "stest", headline, data, _markdown(setup, config, headline, data, results, png, reached))
    return headline


def _draw(ax, results, config, best) -> None:
    series: dict[tuple[int, int], list[dict]] = {}
    for r in results:
        series.setdefault((r["B"], r["T"]), []).append(r)
    for (batch, t), points in sorted(series.items()):
        points.sort(key=lambda r: r["J"])
        ax.plot([p["seconds"] for p in points], [p["spearman_mean"] for p in points], marker="o", ms=3,
                label=f"B={batch}, T={t}")
    ax.axhline(config.threshold, color="grey", ls="--", lw=1, label=f"{config.threshold} of CG")
    ax.scatter([best["seconds"]], [best["spearman_mean"]], s=120, facecolors="none", edgecolors="red", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("s_test seconds for one input (J·T·step time)")
    ax.set_ylabel("Spearman vs CG on the k candidates (mean)")
    ax.set_title("LiSSA: time against agreement with conjugate gradient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _markdown(setup, config, headline, data, results, png, reached) -> str:
    rows = [(r["B"], r["T"], r["J"], r["seconds"], r["spearman_mean"], r["spearman_min"], r["pearson_mean"],
             r["top10_helpful"], r["top10_harmful"]) for r in sorted(results, key=lambda r: (r["B"], r["T"], r["J"]))]
    cg = data["cg"]
    best = data["best"]
    verdict = (f"The fastest configuration whose mean Spearman correlation with CG reaches {config.threshold} is "
               f"**{headline['best_config']}**: estimated {best['seconds']:.2f} s, measured **{headline['best_seconds']:.2f} s** "
               f"for one input's s_test (scoring its {config.k} candidates adds {data['scoring_seconds_k_candidates']:.2f} s)."
               if reached else
               f"No configuration reached {config.threshold}; the most accurate, {headline['best_config']}, is reported.")
    text = f"""# stest: LiSSA's J × B × T against a conjugate-gradient reference

Reproduces FastIF's s_test trade-off (their finding: a small batch with enough steps is as good as a large batch).

{headline_block(headline)}

{verdict}

## Set-up
{setup_block(setup, [
    f"- {len(setup.test_rows[:config.inputs])} test inputs with their gold labels; candidates: each input's k = {config.k} nearest training examples",
    f"- LiSSA damp {config.damp}, scale {config.scale:g} (λ = {config.damp * config.scale:g}); reference: conjugate gradient on "
    f"(H + λI) with H over all N = {setup.num_train} training examples, to relative residual {config.cg_tol:g} "
    f"({cg['iterations']} iterations{', solutions reused from runs/bench/cg-cache' if cg['cached_rows'] else ''})",
    "- agreement: Spearman (and Pearson) correlation of the influence scores on the candidates, mean and min over inputs; "
    "top-10: share of CG's 10 most helpful / harmful candidates that the estimate also ranks top 10",
    f"- seconds: J·T × the measured time of one LiSSA step for one input at that B "
    f"({', '.join(f'B={b}: {s * 1000:.1f} ms' for b, s in data['seconds_per_step_one_input'].items())}); "
    "the chosen configuration was then run for real and timed",
    "- one LiSSA run per B, snapshotted at each J (the same samples a run of that depth would draw); repeats T "
    "are the engine's independent sampling streams, averaged",
    f"- for scale: with no inverse Hessian at all (s_test ∝ the test gradient, i.e. gradient similarity) the mean "
    f"Spearman with CG is {data['gradient_similarity_baseline']['spearman_mean']:.3f} (top-10 helpful "
    f"{data['gradient_similarity_baseline']['top10_helpful']:.2f}), i.e. what the damping λ alone gives "
    "before any curvature is taken into account",
    f"- check: scores from per-candidate gradients equal the engine's JVP scoring to a relative difference of "
    f"{data['jvp_vs_gradient_scores_rel_diff']:.1e}",
])}

![time against agreement]({png.name})

## Grid

{table(["B", "T", "J", "s_test seconds", "Spearman mean", "Spearman min", "Pearson mean", "top-10 helpful", "top-10 harmful"], rows)}
"""
    if data["diverged"]:
        text += "\nDiverged: " + "; ".join(f"B={b}: {m}" for b, m in data["diverged"].items()) + "\n"
    return text
