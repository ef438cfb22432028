"""``recall``: FastIF's kNN recall experiment, in both of the engine's candidate spaces.

For test inputs half predicted right and half wrong, every training example is
scored by influence (s_test from the engine's LiSSA; gold labels), and we ask what
share of the m most helpful and the m most harmful examples (m = 10, 100) are among
the k candidates of the input, for k from 10 to N/10: the k strongest inner products
of output-layer gradients (the engine's default space) and FastIF's k nearest
first-token features under L2 (fastif/knn.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastif import IndexConfig, LissaConfig, Query, knn

from .common import Clock, bars, engine_progress, headline_block, plot, setup_block, table, write_results
from .exact import gradient_scores


@dataclass(frozen=True)
class RecallConfig:
    inputs_each: int  # inputs predicted right, and as many predicted wrong
    ks: tuple[int, ...]
    ms: tuple[int, ...]
    lissa: LissaConfig
    headline_k: int = 1000


DEFAULT = RecallConfig(inputs_each=10, ks=(10, 20, 50, 100, 200, 500, 1000), ms=(10, 100),
                       lissa=LissaConfig(damp=5e-3, scale=1e4, depth=300, batch_size=1))
QUICK = RecallConfig(inputs_each=3, ks=(5, 10, 24), ms=(5, 10), lissa=LissaConfig(damp=5e-3, scale=1e4, depth=50, batch_size=1))


def choose_inputs(engine, rows, each: int) -> tuple[list, list[bool]]:
    """``each`` inputs the model gets right and ``each`` it gets wrong (as many as exist), in file order."""
    encoded = engine.encode([Query(r.text) for r in rows])
    predicted = [int(p.argmax()) for p in encoded.probs]
    right = [r for r, p in zip(rows, predicted) if p == r.label][:each]
    wrong = [r for r, p in zip(rows, predicted) if p != r.label][:each]
    return right + wrong, [True] * len(right) + [False] * len(wrong)


def recall_at(order: np.ndarray, top: np.ndarray, k: int) -> float:
    return len(set(order[:k].tolist()) & set(top.tolist())) / len(top)


def run(setup, out: Path, config: RecallConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    with bars() as progress:
        engine = setup.engine(on_progress=engine_progress(progress))
        n = engine.num_train
        train_labels = [ex.label for ex in engine.train]
        ks = sorted({k for k in config.ks if k <= max(1, n // 10)} | {max(1, n // 10)})
        rows, correct = choose_inputs(engine, setup.test_rows, config.inputs_each)
        plan = engine.plan([Query(r.text, label=r.label) for r in rows])
        solution = engine.solve(plan.vectors, config.lissa, on_progress=engine_progress(progress))
        s_tests = solution.vectors
        task = progress.add_task(f"influence of all {n} training examples", total=n)
        norms: list[float] = []
        scores = gradient_scores(engine, range(n), s_tests, on_step=lambda done: progress.update(task, completed=done),
                                 norms=norms)
        scores = scores.numpy()  # [inputs, N]
    grad_norm = np.asarray(norms)
    norm_percentile = grad_norm.argsort().argsort() / (n - 1)  # 0 = smallest gradient, 1 = largest

    k_max = max(ks)
    # The engine's own index searches the gradient space; FastIF's feature index over the same features.
    indices = {"gradient": engine.index, "feature": knn.build_index(engine.features, IndexConfig(space="feature"))}
    queries = {"gradient": [q.key for q in plan.search], "feature": [q.feature for q in plan.search]}
    per_input = []
    for i in range(len(rows)):
        ranking = np.argsort(scores[i], kind="stable")
        entry = {"correct": correct[i], "label": rows[i].label, "recall": {space: {} for space in SPACES},
                 "top_gradient_norm_percentile": {}}
        for space in SPACES:
            order = knn.search(indices[space], queries[space][i], k_max)
            for m in config.ms:
                for side, top in (("helpful", ranking[:m]), ("harmful", ranking[::-1][:m])):
                    entry["recall"][space][f"{side}_top{m}"] = {k: recall_at(order, top, k) for k in ks}
        for m in config.ms:
            for side, top in (("helpful", ranking[:m]), ("harmful", ranking[::-1][:m])):
                entry["top_gradient_norm_percentile"][f"{side}_top{m}"] = float(norm_percentile[top].mean())
        per_input.append(entry)

    def mean(space: str, key: str, k: int, subset=None) -> float:
        chosen = [e for e in per_input if subset is None or e["correct"] == subset]
        return float(np.mean([e["recall"][space][key][k] for e in chosen])) if chosen else float("nan")

    keys = [f"{side}_top{m}" for m in config.ms for side in ("helpful", "harmful")]
    summary = {space: {key: {k: mean(space, key, k) for k in ks} for key in keys} for space in SPACES}
    by_group = {space: {group: {key: {k: mean(space, key, k, flag) for k in ks} for key in keys}
                        for group, flag in (("predicted_right", True), ("predicted_wrong", False))}
                for space in SPACES}
    # Why recall is what it is: where the most influential examples sit by gradient norm, and by distance.
    diagnosis = {
        "top10_gradient_norm_percentile": {side: float(np.mean([e["top_gradient_norm_percentile"][f"{side}_top{min(config.ms)}"]
                                                                for e in per_input]))
                                           for side in ("helpful", "harmful")},
        "top10_share_with_training_label_equal_to_test_label": {
            side: float(np.mean([np.mean([train_labels[j] == rows[i].label for j in
                                          (np.argsort(scores[i], kind="stable")[:min(config.ms)] if side == "helpful"
                                           else np.argsort(scores[i], kind="stable")[::-1][:min(config.ms)])])
                                 for i in range(len(rows))]))
            for side in ("helpful", "harmful")},
    }
    head_k = config.headline_k if config.headline_k in ks else k_max
    m0 = min(config.ms)

    def both_sides(space: str) -> float:
        return round((summary[space][f"helpful_top{m0}"][head_k] + summary[space][f"harmful_top{m0}"][head_k]) / 2, 4)

    headline = {"recall_at_1000_top10": both_sides("gradient"), "recall_at_1000_top10_feature_knn": both_sides("feature")}

    out.mkdir(parents=True, exist_ok=True)
    png = plot(out / "recall.png", lambda ax: _draw(ax, summary, ks, n, keys))
    data = {"config": {**asdict(config), "lissa": asdict(config.lissa)}, "num_train": n, "ks": ks,
            "headline_k": head_k, "headline_m": m0, "inputs": len(rows), "predicted_right": sum(correct),
            "predicted_wrong": len(correct) - sum(correct), "lissa_converged": solution.converged,
            "recall_mean": summary, "recall_by_group": by_group, "diagnosis": diagnosis, "per_input": per_input,
            "suite_seconds": clock.seconds}
    write_results(out, "recall", headline, data, _markdown(setup, config, headline, data, summary, by_group, ks, keys, png))
    return headline


SPACES = ("gradient", "feature")
SPACE_NAMES = {"gradient": "gradient space (the engine's default)", "feature": "feature space (FastIF's kNN)"}


def _draw(ax, summary, ks, n, keys) -> None:
    for space, style in zip(SPACES, ("-", "--")):
        for colour, key in enumerate(keys):
            ax.plot(ks, [summary[space][key][k] for k in ks], marker="o", ms=3, ls=style, color=f"C{colour}",
                    label=f"{key.replace('_', ' ')}, {space}")
    ax.plot(ks, [k / n for k in ks], color="grey", lw=1, ls=":", label="random k of N")
    ax.set_xscale("log")
    ax.set_xlabel("k candidates (solid: gradient space, dashed: FastIF's feature kNN)")
    ax.set_ylabel("recall of the top-m by full influence")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"kNN recall of the most influential training examples (N = {n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _markdown(setup, config, headline, data, summary, by_group, ks, keys, png) -> str:
    lissa = config.lissa
    diag = data["diagnosis"]
    percentiles = diag["top10_gradient_norm_percentile"].values()
    large = (": influence is ⟨∇L(z), s_test⟩, so examples with large loss gradients (the model still gets them wrong or "
             "is unsure) dominate both ends, wherever they sit in feature space;" if min(percentiles) >= 0.75 else ";")
    sections = []
    for space in SPACES:
        rows = [(k, *[summary[space][key][k] for key in keys], k / data["num_train"]) for k in ks]
        group_rows = [(group.replace("_", " "), *[values[key][data["headline_k"]] for key in keys])
                      for group, values in by_group[space].items()]
        sections.append(f"""## {SPACE_NAMES[space][0].upper() + SPACE_NAMES[space][1:]}

Mean recall over all inputs:

{table(["k", *[key.replace('_', ' ') for key in keys], "random (k/N)"], rows)}

By prediction, at k = {data['headline_k']}:

{table(["inputs", *[key.replace('_', ' ') for key in keys]], group_rows)}
""")
    return f"""# recall: do the k candidates hold the most influential training examples?

FastIF's kNN recall experiment: full influence over all N training examples against the candidate set, for
both of the engine's candidate spaces (`index.space` of a model; fastif/knn.py): `gradient`, the k training
examples whose output-layer loss gradient has the largest inner product with the input's, of either sign; and
`feature`, FastIF's k nearest first-token features under L2.

{headline_block(headline)}

(`recall_at_1000_top10`: in the gradient space, the engine's default, the mean of the top-{data['headline_m']}
helpful and top-{data['headline_m']} harmful recall at k = {data['headline_k']}{'' if data['headline_k'] == 1000 else ' (k = 1000 exceeds N/10 here)'}, over all inputs;
`recall_at_1000_top10_feature_knn`: the same for FastIF's feature kNN.)

## Set-up
{setup_block(setup, [
    f"- {data['inputs']} test inputs: {data['predicted_right']} predicted right, {data['predicted_wrong']} predicted wrong; "
    "influence taken with respect to the gold label",
    f"- full influence: s_test by the engine's LiSSA (J = {lissa.depth}, B = {lissa.batch_size}, damp {lissa.damp}, "
    f"scale {lissa.scale:g}{'; FastIF' + chr(39) + 's configuration' if (lissa.depth, lissa.batch_size) == (1000, 1) else ''}), then every one of the N = {data['num_train']} training examples "
    "scored (-⟨∇L(z), s_test⟩); top-m helpful = the m most negative scores, harmful = the m most positive",
    f"- k ranges from {ks[0]} to N/10 = {data['num_train'] // 10}: note k = 1000 is a tenth of this training set, while FastIF's "
    "k = 1000 was 0.25% of MNLI's 393K",
])}

![recall against k]({png.name})

{chr(10).join(sections)}
## What the most influential examples are

- gradient norm: the top-{data['headline_m']} helpful sit on average at percentile
  {diag['top10_gradient_norm_percentile']['helpful'] * 100:.0f} of all N training-gradient norms, the harmful at percentile
  {diag['top10_gradient_norm_percentile']['harmful'] * 100:.0f} (50 would be typical){large}
- label: {diag['top10_share_with_training_label_equal_to_test_label']['helpful'] * 100:.0f}% of the top-{data['headline_m']}
  helpful carry the test input's label, and {diag['top10_share_with_training_label_equal_to_test_label']['harmful'] * 100:.0f}%
  of the harmful do;
- FastIF's feature kNN finds examples that look alike to the model, but the score also weighs how large and how
  aligned each example's loss gradient is; the gradient space searches exactly that for the output layer
  (⟨∇_W ℓ(z), ∇_W ℓ(z_t)⟩ = ⟨p − e_y, p_t − e_t⟩·⟨a, a_t⟩), and the output error p − e_y it weighs is what
  back-propagation carries into every other layer's gradient.
"""
