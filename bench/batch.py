"""``batch``: what one input costs when 1, 8 or 32 inputs come in one job, and a dataset job's inputs per second.

Each job is ``InfluenceEngine.analyze`` on distinct inputs (their predicted
labels, no cache) — the computation a worker runs for one influence job, without
Redis. The engine solves all inputs' s_test in one LiSSA run (one sampled batch per
step for every vector) and scores each input's own k candidates, running each candidate
forward and backward once however many inputs list it (fastif/factored.py).
Then one dataset job (``inputs_from``) through the real stack on 1 and on 2 workers
(bench/dataset_jobs.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastif import LissaConfig, Query, SolverConfig

from . import dataset_jobs
from .common import Clock, bars, engine_progress, headline_block, setup_block, table, warm_prefix_cache, write_results
from .speed import best_from_stest


@dataclass(frozen=True)
class BatchConfig:
    sizes: tuple[int, ...]
    k: int
    fastif: LissaConfig  # the API's default request
    fastif_sample_depth: int  # its LiSSA is timed over this many steps and multiplied out
    fallback_best: LissaConfig  # the headline runs stest's best configuration; this when stest.json is absent


DEFAULT = BatchConfig(sizes=(1, 8, 32), k=1000, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=1000, batch_size=1),
                      fastif_sample_depth=100, fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=100, batch_size=4))
QUICK = BatchConfig(sizes=(1, 8, 32), k=60, fastif=LissaConfig(damp=5e-3, scale=1e4, depth=30, batch_size=1),
                    fastif_sample_depth=30, fallback_best=LissaConfig(damp=5e-3, scale=1e4, depth=20, batch_size=4))


def run(setup, out: Path, config: BatchConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    best, best_note = best_from_stest(out, config.fallback_best)
    # `default`: the service's default request (EK-FAC; its factors are fitted once per model, before timing).
    configs = {"default": SolverConfig(), "best": best, "fastif": config.fastif}
    needed = sum(config.sizes)
    if len(setup.test_rows) < needed:
        raise RuntimeError(f"{needed} distinct test inputs needed, {len(setup.test_rows)} available")
    runs = []
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        # Warm-up: first-call allocations and first touches of the prefix cache stay out of the timings.
        warm_prefix_cache(engine)
        engine.analyze([Query(setup.test_rows[-1].text)], k=config.k, solver=LissaConfig(depth=2))
        engine.analyze([Query(setup.test_rows[-1].text)], k=config.k, solver=SolverConfig())  # fits EK-FAC once
        # One job of each size, on inputs the timed jobs do not use: a size's first job in a process paid up to
        # 1.5 s more than the next ones (cause not measured), which a worker pays once.
        spare = setup.test_rows[needed:]
        for size in config.sizes:
            if len(spare) >= size + 1:
                engine.analyze([Query(r.text) for r in spare[1 : size + 1]], k=config.k, solver=SolverConfig())
        for name, solver in configs.items():
            lissa = solver if isinstance(solver, LissaConfig) else None
            start = 0
            for size in config.sizes:
                queries = [Query(r.text) for r in setup.test_rows[start:start + size]]
                start += size
                depth = (min(lissa.depth, config.fastif_sample_depth) if name == "fastif" else lissa.depth) if lissa else 1
                factor = lissa.depth / depth if lissa else 1.0  # 1 unless LiSSA is timed on a sample of its steps
                task = progress.add_task(f"{name}: {size} input(s) in one job", total=depth * (lissa.repeats if lissa else 1))
                on_progress = lambda stage, done, total, t=task: progress.update(t, completed=done) if stage == "s_test" else None
                job = Clock()
                timed = replace(lissa, depth=depth) if lissa else solver
                _, influences = engine.analyze(queries, k=config.k, solver=timed, on_progress=on_progress)
                measured = job.seconds
                stages = {"gradients": influences[0].seconds.get("gradients", 0.0),
                          "s_test": influences[0].seconds.get("s_test", 0.0) * factor,
                          "knn": influences[0].seconds.get("knn", 0.0),
                          "scoring": influences[0].seconds.get("scoring", 0.0)}
                seconds = measured + influences[0].seconds.get("s_test", 0.0) * (factor - 1)
                runs.append({"config": name, "lissa": asdict(lissa) if lissa else None,
                             "solver": asdict(solver) if not lissa else None, "inputs": size, "seconds": seconds,
                             "per_input": seconds / size, "stages": stages, "measured_steps": depth,
                             "extrapolated": factor > 1})
    for r in runs:
        single = next(x for x in runs if x["config"] == r["config"] and x["inputs"] == min(config.sizes))
        r["per_input_ratio"] = r["per_input"] / single["per_input"]
    top = max(config.sizes)
    ratio = next(r["per_input_ratio"] for r in runs if r["config"] == "default" and r["inputs"] == top)
    best_ratio = next(r["per_input_ratio"] for r in runs if r["config"] == "best" and r["inputs"] == top)
    dataset = dataset_jobs.run(setup, on_step=lambda step: None)
    headline = {"per_input_cost_ratio_32_vs_1": round(ratio, 3), "per_input_cost_ratio_32_vs_1_best_lissa": round(best_ratio, 3),
                "dataset_inputs_per_s": round(dataset["dataset_inputs_per_s"], 2),
                "dataset_speedup_2_vs_1_workers": round(dataset["dataset_speedup_2_vs_1_workers"], 3)}
    data = {"config": {"sizes": config.sizes, "k": config.k, "configs": {k: asdict(v) for k, v in configs.items()}},
            "best_note": best_note, "num_train": setup.num_train, "runs": runs, "dataset": dataset,
            "suite_seconds": clock.seconds}
    write_results(out, "batch", headline, data, _markdown(setup, config, configs, headline, data))
    return headline


def _markdown(setup, config, configs, headline, data) -> str:
    rows = []
    for r in data["runs"]:
        l = r["lissa"]
        st = r["stages"]
        described = (f"{r['config']} (J={l['depth']}, B={l['batch_size']}, T={l['repeats']})" if l else
                     f"{r['config']} ({r['solver']['solver']}, {r['solver']['curvature']})")
        rows.append((f"{described}{' *' if r['extrapolated'] else ''}",
                     r["inputs"], r["seconds"],
                     r["per_input"], r["per_input_ratio"], st["gradients"], st["s_test"], st["scoring"]))
    return f"""# batch: per-input cost of 1, 8 and 32 inputs in one job

{headline_block(headline)}

(`per_input_cost_ratio_32_vs_1`: seconds per input of a 32-input job over those of a 1-input job, at the service's
default configuration (`default` below: EK-FAC on the Gauss-Newton matrix), k = {config.k}; goal ≤ 0.25.
`..._best_lissa`: the same at the fastest LiSSA configuration of `fastif bench stest`.)

## Set-up
{setup_block(setup, [
    f"- each job: `InfluenceEngine.analyze` on distinct test inputs (predicted labels, no cache), k = {config.k} candidates each; "
    "before timing, one untimed job of each size at the default configuration on other inputs (a size's first job in a process pays one-time costs)",
    f"- configurations: `default` = the service's default request (EK-FAC, fitted once before timing); `best` = {data['best_note']}; `fastif` = the API's default request (FastIF's J = "
    f"{config.fastif.depth}, B = {config.fastif.batch_size})"
    + (f", whose LiSSA is timed over its first {config.fastif_sample_depth} steps and multiplied out (every step is the "
       "same work; marked *)" if config.fastif_sample_depth < config.fastif.depth else ""),
    "- stage seconds are for the whole job: gradients = encoding and test gradients; s_test = one LiSSA run for all "
    "inputs; scoring = every input's candidates",
])}

## Results

{table(["configuration", "inputs", "job seconds", "seconds per input", "per-input ratio vs 1", "gradients s", "s_test s", "scoring s"], rows)}

## A dataset job through the service

{_dataset_markdown(data["dataset"])}
"""


def _dataset_markdown(dataset: dict) -> str:
    config = dataset["config"]
    rows = [(workers, r["inputs"], r["shards"], r["seconds"], r["inputs_per_s"], r["result_count"])
            for workers, r in sorted(dataset["runs"].items())]
    return f"""One influence job with `inputs_from` ({config['inputs']} inputs: {dataset['source']}), k = {config['k']}, top 10,
the service's default solver, in shards of {config['shard_inputs']} inputs; a fresh stack per row (embedded Redis,
single-process Celery workers of one torch thread each), the model registered and each worker warmed up by a dataset
job of {config['warm_inputs']} other inputs per worker first. Seconds are the job's own, from `started_at` to
`finished_at`. `dataset_speedup_2_vs_1_workers` (goal ≥ 1.8) = inputs per second on 2 workers over 1.

{table(["workers", "inputs", "shards", "job seconds", "inputs per second", "items read back"], rows)}
"""
