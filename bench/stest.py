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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastif import LissaConfig, LissaDivergedError, Query
from fastif.curvature import lissa

from .common import (Clock, bars, engine_progress, headline_block, plot, rel_diff, setup_block, spearman, pearson,
                     table, top_overlap, write_results)
from .exact import cached_cg, gradient_scores


@dataclass(frozen=True)
class Level:
    """One damping setting of the grid: LiSSA's damp and scale (λ = damp·scale) and the CG reference's."""

    name: str
    damp: float
    scale: float
    inputs: int
    grid: tuple[tuple[int, int, int], ...]  # (B, J_max, T_max)
    cg_tol: float

    @property
    def damping(self) -> float:
        return self.damp * self.scale


@dataclass(frozen=True)
class StestConfig:
    k: int
    levels: tuple[Level, ...]  # the first is FastIF's default damping: the headline's
    checkpoints: tuple[int, ...]
    timing_steps: int
    threshold: float = 0.95
    seed: int = 0


DEFAULT = StestConfig(
    k=1000, checkpoints=(10, 25, 50, 100, 200, 300, 500, 1000), timing_steps=20,
    levels=(Level("FastIF's default damping", damp=5e-3, scale=1e4, inputs=3, cg_tol=1e-3,
                  grid=((1, 1000, 1), (1, 200, 2), (4, 300, 1), (16, 100, 1), (64, 25, 1))),
            Level("10x less damping", damp=5e-3, scale=1e3, inputs=2, cg_tol=1e-3,
                  grid=((1, 1000, 1), (4, 500, 1), (16, 200, 1)))))
QUICK = StestConfig(
    k=60, checkpoints=(5, 10, 25, 50), timing_steps=5,
    levels=(Level("FastIF's default damping", damp=5e-3, scale=1e4, inputs=2, cg_tol=1e-4,
                  grid=((1, 50, 2), (4, 50, 1), (16, 25, 1))),
            Level("10x less damping", damp=5e-3, scale=1e3, inputs=2, cg_tol=1e-4, grid=((1, 50, 1), (4, 25, 1)))))


def snapshot_lissa(engine, vectors: torch.Tensor, batch: int, j_max: int, t_max: int, checkpoints, damp: float,
                   scale: float, seed: int, on_step=None) -> dict[tuple[int, int], torch.Tensor]:
    """s_test after J steps of repeat r, for every checkpoint J ≤ j_max: {(r, J): [m, P]}.

    Runs the engine's ``lissa`` with depth j_max + 1 and reads h where the HVP receives it
    (call J of a repeat sees h after J updates); the extra last step is discarded.
    """
    wanted = {j for j in checkpoints if j <= j_max}
    snaps: dict[tuple[int, int], torch.Tensor] = {}
    calls = 0

    def hvp(indices, h, out=None):
        nonlocal calls
        repeat, step = divmod(calls, j_max + 1)
        if step in wanted:
            snaps[(repeat, step)] = h.detach().clone() / scale
        calls += 1
        return engine.hvp(indices, h, out)

    config = LissaConfig(damp=damp, scale=scale, depth=j_max + 1, batch_size=batch, repeats=t_max, seed=seed)
    lissa(hvp, vectors, engine.num_train, config, on_step)
    return snaps


def step_seconds(engine, vector: torch.Tensor, batch: int, steps: int, damp: float, scale: float) -> float:
    """Measured seconds per LiSSA step at batch B for one input (the engine's solve, end to end)."""
    engine.solve(vector, LissaConfig(damp=damp, scale=scale, depth=2, batch_size=batch, seed=99))  # warm-up
    clock = Clock()
    engine.solve(vector, LissaConfig(damp=damp, scale=scale, depth=steps, batch_size=batch, seed=98))
    return clock.seconds / steps


def _level(engine, setup, level: Level, config: StestConfig, per_step: dict, progress) -> dict:
    """CG reference, the LiSSA grid and every configuration's agreement, at one damping level."""
    rows = setup.test_rows[:level.inputs]
    plan = engine.plan([Query(r.text, label=r.label) for r in rows])
    vectors = plan.vectors
    candidates = [engine.candidates(plan.search[i], config.k).indices for i in range(len(rows))]
    task = progress.add_task(f"λ={level.damping:g}: CG reference", total=None)
    cg, cg_info = cached_cg(engine, setup.workdir / "cg-cache", [f"{r.text}|{r.label}" for r in rows], vectors,
                            level.damping, tol=level.cg_tol,
                            on_iter=lambda it, res: progress.update(task, completed=it,
                                                                    description=f"λ={level.damping:g}: CG, residual {res:.1e}"))
    progress.update(task, total=1, completed=1)

    snapshots: dict[tuple[int, int, int], torch.Tensor] = {}  # (B, repeat, J) -> [m, P]
    diverged: dict[str, str] = {}
    run_seconds: dict[str, float] = {}
    for batch, j_max, t_max in level.grid:
        name = f"B={batch}, J<={j_max}, T<={t_max}"
        task = progress.add_task(f"λ={level.damping:g}: LiSSA {name}", total=(j_max + 1) * t_max)
        run_clock = Clock()
        try:
            snaps = snapshot_lissa(engine, vectors, batch, j_max, t_max, config.checkpoints, level.damp, level.scale,
                                   config.seed, on_step=lambda done, total, t=task: progress.update(t, completed=done) and False)
        except LissaDivergedError as err:
            diverged[name] = str(err)
            continue
        run_seconds[name] = run_clock.seconds
        for (repeat, j), value in snaps.items():
            snapshots[(batch, repeat, j)] = value
    for batch in sorted({batch for batch, _, _ in level.grid} - set(per_step)):
        per_step[batch] = step_seconds(engine, vectors[:1], batch, config.timing_steps, level.damp, level.scale)

    # Scores on each input's candidates: CG, the plain gradient and every snapshot, from each candidate's gradient once.
    keys = sorted(snapshots)
    reference_scores, plain_scores, snapshot_scores = [], [], []
    task = progress.add_task(f"λ={level.damping:g}: scoring candidates", total=len(rows) * config.k)
    for i in range(len(rows)):
        directions = torch.stack([cg[i], vectors[i]] + [snapshots[key][i] for key in keys])
        scores = gradient_scores(engine, candidates[i], directions,
                                 on_step=lambda done, base=i * config.k: progress.update(task, completed=base + done))
        reference_scores.append(scores[0].numpy())
        plain_scores.append(scores[1].numpy())
        snapshot_scores.append({key: scores[2 + n].numpy() for n, key in enumerate(keys)})
    jvp_check = rel_diff(engine.score(cg[0], candidates[0]), reference_scores[0])

    results, seen = [], set()
    for batch, j_max, t_max in level.grid:
        if f"B={batch}, J<={j_max}, T<={t_max}" in diverged:
            continue
        for t in [t for t in (1, 2, 4, 8, 16) if t <= t_max]:
            for j in sorted(j for j in config.checkpoints if j <= j_max):
                if (batch, t, j) in seen:
                    continue
                seen.add((batch, t, j))
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

    # Without any inverse Hessian (s_test ∝ the test gradient): what the damping alone gives.
    baseline = {"spearman_mean": float(np.mean([spearman(p, r) for p, r in zip(plain_scores, reference_scores)])),
                "top10_helpful": float(np.mean([top_overlap(r, p, 10) for p, r in zip(plain_scores, reference_scores)])),
                "top10_harmful": float(np.mean([top_overlap(r, p, 10, harmful=True)
                                                for p, r in zip(plain_scores, reference_scores)]))}
    good = [r for r in results if r["spearman_mean"] >= config.threshold]
    best = (min(good, key=lambda r: r["seconds"]) if good else
            max(results, key=lambda r: r["spearman_mean"]) if results else None)
    # A stricter reading: the Spearman threshold and at least 8 of CG's top-10 helpful and harmful candidates.
    strict = [r for r in good if min(r["top10_helpful"], r["top10_harmful"]) >= 0.8]
    strict_best = min(strict, key=lambda r: r["seconds"]) if strict else None
    measured = None
    if best is not None:
        clock = Clock()
        engine.solve(vectors[:1], LissaConfig(damp=level.damp, scale=level.scale, depth=best["J"], batch_size=best["B"],
                                              repeats=best["T"], seed=config.seed))
        measured = clock.seconds
        best = {**best, "measured_seconds": measured, "reached_threshold": bool(good)}
    scoring_clock = Clock()
    engine.score(cg[0], candidates[0])
    return {"name": level.name, "damp": level.damp, "scale": level.scale, "damping": level.damping,
            "inputs": len(rows), "grid": level.grid, "cg": {**cg_info, "tol": level.cg_tol}, "best": best,
            "strict_best": strict_best,
            "diverged": diverged, "grid_run_seconds_all_inputs": run_seconds,
            "scoring_seconds_k_candidates": scoring_clock.seconds, "jvp_vs_gradient_scores_rel_diff": jvp_check,
            "gradient_similarity_baseline": baseline, "results": results}


def run(setup, out: Path, config: StestConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    per_step: dict[int, float] = {}
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        levels = [_level(engine, setup, level, config, per_step, progress) for level in config.levels]
    main = levels[0]
    if main["best"] is None:
        raise RuntimeError(f"every LiSSA run diverged at {main['name']}: {main['diverged']}")
    best = main["best"]
    headline = {"best_config": f"J={best['J']}, B={best['B']}, T={best['T']}",
                "best_seconds": round(best["measured_seconds"], 3)}
    out.mkdir(parents=True, exist_ok=True)
    png = plot(out / "stest.png", lambda axes: [_draw(ax, level, config) for ax, level in zip(axes, levels)],
               panels=len(levels))
    data = {"config": {"k": config.k, "checkpoints": config.checkpoints, "timing_steps": config.timing_steps,
                       "threshold": config.threshold, "seed": config.seed},
            "num_train": setup.num_train, "best": best, "damping": main["damping"],
            "seconds_per_step_one_input": per_step, "levels": levels, "suite_seconds": clock.seconds}
    write_results(out, "stest", headline, data, _markdown(setup, config, headline, data, png))
    return headline


def _draw(ax, level: dict, config: StestConfig) -> None:
    series: dict[tuple[int, int], list[dict]] = {}
    for r in level["results"]:
        series.setdefault((r["B"], r["T"]), []).append(r)
    for (batch, t), points in sorted(series.items()):
        points.sort(key=lambda r: r["J"])
        ax.plot([p["seconds"] for p in points], [p["spearman_mean"] for p in points], marker="o", ms=3,
                label=f"B={batch}, T={t}")
    ax.axhline(config.threshold, color="grey", ls="--", lw=1, label=f"{config.threshold} of CG")
    ax.axhline(level["gradient_similarity_baseline"]["spearman_mean"], color="black", ls=":", lw=1,
               label="no inverse Hessian")
    if level["best"]:
        ax.scatter([level["best"]["seconds"]], [level["best"]["spearman_mean"]], s=120, facecolors="none",
                   edgecolors="red", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("s_test seconds for one input (J·T·step time)")
    ax.set_ylabel("Spearman vs CG on the k candidates (mean)")
    ax.set_title(f"{level['name']}: damp {level['damp']:g}, scale {level['scale']:g} (λ = {level['damping']:g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _level_markdown(level: dict, config: StestConfig) -> str:
    rows = [(r["B"], r["T"], r["J"], r["seconds"], f"{r['spearman_mean']:.4f}", f"{r['spearman_min']:.4f}",
             f"{r['pearson_mean']:.4f}", r["top10_helpful"], r["top10_harmful"])
            for r in sorted(level["results"], key=lambda r: (r["B"], r["T"], r["J"]))]
    best, base, cg = level["best"], level["gradient_similarity_baseline"], level["cg"]
    if best is None:
        verdict = "Every LiSSA run diverged."
    elif best["reached_threshold"]:
        verdict = (f"Fastest within {config.threshold} Spearman of CG: **J={best['J']}, B={best['B']}, T={best['T']}**, "
                   f"estimated {best['seconds']:.2f} s, measured {best['measured_seconds']:.2f} s for one input's s_test "
                   f"(scoring its {config.k} candidates adds {level['scoring_seconds_k_candidates']:.2f} s).")
    else:
        verdict = (f"No configuration reached {config.threshold}; the most accurate is J={best['J']}, B={best['B']}, "
                   f"T={best['T']} ({best['spearman_mean']:.4f}).")
    strict = level["strict_best"]
    verdict += (f" Stricter (also ≥ 8 of CG's top-10 helpful and harmful): J={strict['J']}, B={strict['B']}, T={strict['T']}, "
                f"estimated {strict['seconds']:.2f} s." if strict else
                " No configuration also keeps 8 of CG's top-10 helpful and harmful candidates.")
    text = f"""## {level['name']}: damp {level['damp']:g}, scale {level['scale']:g}, λ = {level['damping']:g}

{verdict}

- {level['inputs']} test inputs (gold labels); CG reference to relative residual {cg['tol']:g}: {cg['iterations']} iterations
  run now{f", {cg['cached_rows']} solution(s) reused from runs/bench/cg-cache" if cg['cached_rows'] else ''}
- with no inverse Hessian at all (s_test ∝ the test gradient: gradient similarity) the mean Spearman with CG is
  **{base['spearman_mean']:.4f}** (top-10 helpful {base['top10_helpful']:.2f}, harmful {base['top10_harmful']:.2f}): the share
  of the agreement that needs no curvature
- check: scores from per-candidate gradients equal the engine's JVP scoring to a relative difference of
  {level['jvp_vs_gradient_scores_rel_diff']:.1e}

{table(["B", "T", "J", "s_test seconds", "Spearman mean", "Spearman min", "Pearson mean", "top-10 helpful", "top-10 harmful"], rows)}
"""
    if level["diverged"]:
        text += "\nDiverged: " + "; ".join(f"{name}: {message}" for name, message in level["diverged"].items()) + "\n"
    return text


def _markdown(setup, config: StestConfig, headline: dict, data: dict, png) -> str:
    per_step = ", ".join(f"B={b}: {s * 1000:.1f} ms" for b, s in sorted(data["seconds_per_step_one_input"].items()))
    sections = "\n".join(_level_markdown(level, config) for level in data["levels"])
    return f"""# stest: LiSSA's J × B × T against a conjugate-gradient reference

Reproduces FastIF's s_test trade-off (their finding: a small batch with enough steps is as good as a large batch).
The headline is at FastIF's default damping (the API's default); a second level with 10× less damping shows the
trade-off where the curvature matters more.

{headline_block(headline)}

## Set-up
{setup_block(setup, [
    f"- candidates: each input's k = {config.k} nearest training examples; reference: conjugate gradient on (H + λI) with "
    f"H over all N = {setup.num_train} training examples, at each level's λ",
    "- agreement: Spearman (and Pearson) correlation of the influence scores on the candidates, mean and min over inputs; "
    "top-10: share of CG's 10 most helpful / harmful candidates that the estimate also ranks top 10",
    f"- seconds: J·T × the measured time of one LiSSA step for one input at that B ({per_step}); each level's chosen "
    "configuration was then run for real and timed (the headline's `best_seconds`)",
    "- one LiSSA run per grid row (B, J_max, T_max) for all inputs at once, snapshotted at each J (the same samples a run "
    "of that depth would draw); repeats T are the engine's independent sampling streams, averaged",
])}

![time against agreement]({png.name})

{sections}"""
