"""``batch``: what one input costs when 1, 8 or 32 inputs come in one job.

Each job is ``InfluenceEngine.analyze`` on distinct inputs (their predicted
labels, no cache) — the computation a worker runs for one influence job, without
Redis. The engine solves all inputs' s_test in one LiSSA run (one sampled batch per
step for every vector) and scores each input's own k candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from fastif import LissaConfig, Query

from .common import Clock, bars, engine_progress, headline_block, setup_block, table, write_results
from .speed import best_from_stest


@dataclass(frozen=True)
class BatchConfig:
    sizes: tuple[int, ...]
    k: int
    fastif: LissaConfig  # the API's default request: the headline
    fallback_best: LissaConfig


DEFAULT = BatchConfig(sizes=(1, 8, 32), k=1000, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=1000, batch_size=1),
                      fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=100, batch_size=4))
QUICK = BatchConfig(sizes=(1, 8, 32), k=60, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=30, batch_size=1),
                    fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=20, batch_size=4))


def run(setup, out: Path, config: BatchConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    best, best_note = best_from_stest(out, config.fallback_best)
    configs = {"fastif": config.fastif}
    if (best.depth, best.batch_size, best.repeats) != (config.fastif.depth, config.fastif.batch_size, config.fastif.repeats):
        configs["best"] = best
    needed = sum(config.sizes)
    if len(setup.test_rows) < needed:
        raise RuntimeError(f"{needed} distinct test inputs needed, {len(setup.test_rows)} available")
    runs = []
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        # Warm-up: first-call allocations and forward-mode set-up stay out of the timings.
        engine.analyze([Query(setup.test_rows[-1].text)], k=10, solver=LissaConfig(depth=2))
        for name, lissa in configs.items():
            start = 0
            for size in config.sizes:
                queries = [Query(r.text) for r in setup.test_rows[start:start + size]]
                start += size
                task = progress.add_task(f"{name}: {size} input(s) in one job", total=lissa.depth * lissa.repeats)
                on_progress = lambda stage, done, total, t=task: progress.update(t, completed=done) if stage == "s_test" else None
                job = Clock()
                _, influences = engine.analyze(queries, k=config.k, solver=lissa, on_progress=on_progress)
                seconds = job.seconds
                stages = {"gradients": influences[0].seconds.get("gradients", 0.0),
                          "s_test": influences[0].seconds.get("s_test", 0.0),
                          "knn": sum(i.seconds.get("knn", 0.0) for i in influences),
                          "scoring": sum(i.seconds.get("scoring", 0.0) for i in influences)}
                runs.append({"config": name, "lissa": asdict(lissa), "inputs": size, "seconds": seconds,
                             "per_input": seconds / size, "stages": stages})
    for r in runs:
        single = next(x for x in runs if x["config"] == r["config"] and x["inputs"] == min(config.sizes))
        r["per_input_ratio"] = r["per_input"] / single["per_input"]
    top = max(config.sizes)
    ratio = next(r["per_input_ratio"] for r in runs if r["config"] == "fastif" and r["inputs"] == top)
    headline = {"per_input_cost_ratio_32_vs_1": round(ratio, 3)}
    data = {"config": {"sizes": config.sizes, "k": config.k, "configs": {k: asdict(v) for k, v in configs.items()}},
            "best_note": best_note, "num_train": setup.num_train, "runs": runs, "suite_seconds": clock.seconds}
    write_results(out, "batch", headline, data, _markdown(setup, config, configs, headline, data))
    return headline


def _markdown(setup, config, configs, headline, data) -> str:
    rows = []
    for r in data["runs"]:
        l = r["lissa"]
        st = r["stages"]
        rows.append((f"{r['config']} (J={l['depth']}, B={l['batch_size']}, T={l['repeats']})", r["inputs"], r["seconds"],
                     r["per_input"], r["per_input_ratio"], st["gradients"], st["s_test"], st["scoring"]))
    return f"""# batch: per-input cost of 1, 8 and 32 inputs in one job

{headline_block(headline)}

(`per_input_cost_ratio_32_vs_1`: seconds per input of a 32-input job over those of a 1-input job, at the API's
default LiSSA configuration, J = {config.fastif.depth}, B = {config.fastif.batch_size}, k = {config.k}; goal ≤ 0.25.)

## Set-up
{setup_block(setup, [
    f"- each job: `InfluenceEngine.analyze` on distinct test inputs (predicted labels, no cache), k = {config.k} candidates each",
    "- configurations: `fastif` = the API's default request (FastIF's); "
    + (f"`best` = {data['best_note']}" if "best" in configs else "no separate best configuration (the same as FastIF's)"),
    "- stage seconds are for the whole job: gradients = encoding and test gradients; s_test = one LiSSA run for all "
    "inputs; scoring = every input's candidates",
])}

## Results

{table(["configuration", "inputs", "job seconds", "seconds per input", "per-input ratio vs 1", "gradients s", "s_test s", "scoring s"], rows)}
"""
