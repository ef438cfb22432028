"""The engine's unit costs at FastIF's reference setting: one LiSSA step at B = 1 and B = 8,
one whole LiSSA run's step (solver overhead included), and scoring 1,000 candidates.

    python -m bench.step_costs --model DIR --data FILE.jsonl|FILE.tsv [--max-length 66] [--threads 1]

A .tsv is read as the packed SST-2 files of ``fastif bench`` (runs/bench/data-*/train.tsv).
The inputs should be long enough to fill ``--max-length`` tokens (66 in DESIGN.md §4).
To compare two versions of the engine back to back, run this file with the other
checkout first on the path: ``PYTHONPATH=../old-checkout python bench/step_costs.py …``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig


def measure(engine: InfluenceEngine, repeats: int = 40) -> dict:
    vector = torch.randn(1, engine.num_params) * 1e-3
    costs = {}
    for batch in (1, 8):
        for i in range(5):  # warm-up
            engine.hvp(list(range(i, i + batch)), vector)
        clock = time.perf_counter()
        for i in range(repeats):
            engine.hvp(list(range(i, i + batch)), vector)
        costs[f"lissa_step_ms_B{batch}"] = round((time.perf_counter() - clock) / repeats * 1000, 1)
    clock = time.perf_counter()
    engine.solve(vector, LissaConfig(depth=repeats * 5))
    costs["lissa_run_step_ms_B1"] = round((time.perf_counter() - clock) / (repeats * 5) * 1000, 1)
    direction = torch.randn(engine.num_params)
    count = min(1000, engine.num_train)
    engine.score(direction, range(32))
    clock = time.perf_counter()
    engine.score(direction, range(count), batch_size=128)
    costs[f"score_{count}_s"] = round(time.perf_counter() - clock, 2)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--max-length", type=int, default=66)
    parser.add_argument("--artefacts", type=Path, default=Path("runs/step-costs"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = (DataSpec(str(args.data), text_field="sentence", quoting="none") if args.data.suffix == ".tsv"
            else DataSpec(str(args.data)))
    engine = InfluenceEngine.from_paths(args.model, data, InfluenceSpec(max_length=args.max_length),
                                        artefact_dir=args.artefacts, device="cpu")
    engine.prepare()
    print(json.dumps({"num_params": engine.num_params, "first_token_last_block": engine.first_token.enabled,
                      "prefix_cached": engine.prefix is not None, **measure(engine)}))


if __name__ == "__main__":
    main()
