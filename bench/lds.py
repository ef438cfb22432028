"""``lds``: are the influence scores true? The linear datamodeling score of each solver configuration.

Per test input z_t (gold label): Spearman's ρ over random half subsets S of the
training set between Σ_{i∈S} I(z_i, z_t) (the scores' prediction) and z_t's loss after
retraining on S (fastif/quality/). The retraining warm-starts from the fine-tuned
influence parameters and trains only them, on the cached frozen-prefix activations,
minimising the engine's objective; two shuffling seeds per subset say how
reproducible the retraining itself is (``retraining_noise``: the most any scores can
reach is about that).

Every configuration is scored on the same model, the same N = 2,000 training
examples (the first 2,000 of the bench's packed SST-2 set), the same inputs and the
same subsets: the engine at its default ``SolverConfig()``, FastIF's published LiSSA
configuration, CG, EK-FAC, K-FAC, a plain gradient dot product, and Kronfluence
(EK-FAC and K-FAC on the same tracked modules) when it is installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastif import IndexConfig, InfluenceEngine, Query
from fastif.config import SolverConfig
from fastif.quality import LDSResult, RetrainConfig, eval_set, lds, random_subsets, retrained_test_losses

from .common import Clock, bars, engine_progress, fmt, headline_block, log, setup_block, table, write_results
from .data import read_rows, tsv_spec, write_tsv


# -- the LDS set-up: the bench model on the first N training rows ---------------------------------------------
def lds_train_file(setup, num_train: int) -> Path:
    """The first ``num_train`` rows of the bench's packed training file, written once under the bench's workdir."""
    rows = read_rows(setup.train_path)[:num_train]
    digest = hashlib.sha256("\n".join(f"{r.text}\t{r.label}" for r in rows).encode()).hexdigest()[:12]
    path = setup.workdir / f"lds-{digest}-{len(rows)}" / "train.tsv"
    if not path.is_file():
        write_tsv(path, rows)
    return path


def lds_engine(setup, num_train: int, on_progress=None) -> InfluenceEngine:
    """The bench model with the first ``num_train`` training rows; prefix cache and index kept under runs/bench/."""
    path = lds_train_file(setup, num_train)
    engine = InfluenceEngine.from_paths(setup.model_dir, tsv_spec(path), setup.spec(), IndexConfig(),
                                        artefact_dir=setup.workdir / "artefacts", device="cpu")
    engine.prepare(on_progress)
    return engine


def lds_inputs(setup, count: int) -> list[Query]:
    return [Query(row.text, label=row.label) for row in setup.test_rows[:count]]


# -- what is measured ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One configuration of the table: a result key, a description, and what ``engine.analyze`` is given.

    ``inputs`` None scores every input; a number scores the first that many (for slow solvers).
    ``group``: "main" rows are the comparison, "sweep" rows the damping sweep.
    """

    key: str
    label: str
    solver: Any
    inputs: int | None = None
    group: str = "main"


@dataclass(frozen=True)
class LdsConfig:
    num_train: int
    num_inputs: int
    num_subsets: int
    fraction: float
    retrain: RetrainConfig
    slow_inputs: int  # inputs scored by LiSSA at FastIF's depth
    cg_inputs: int  # inputs scored by CG (each iteration is a curvature product over all N examples per input)
    lissa_depth: int  # FastIF's paper configuration: depth J (1000 in the paper)
    sweep_ratios: tuple[float, ...]  # damping_ratio values of the EK-FAC sweep, λ per block (the default scope)
    cg_sweep_ratios: tuple[float, ...]
    cg_max_iter: int = 200
    curvature_sweep_ratios: tuple[float, ...] = ()  # the EK-FAC sweep with λ relative to the whole curvature
    kronfluence: bool = True
    seed: int = 0
    # How much the ranking depends on the retraining: other retrainings of the first subsets, scored by
    # the configurations that score every input.
    sensitivity: tuple[RetrainConfig, ...] = ()
    sensitivity_subsets: int = 24


# Retraining: see RetrainConfig's defaults in fastif/quality/ and "the retraining" in lds.md.
DEFAULT = LdsConfig(num_train=2000, num_inputs=48, num_subsets=48, fraction=0.5, retrain=RetrainConfig(),
                    slow_inputs=8, cg_inputs=2, lissa_depth=1000, sweep_ratios=(0.1, 1.0, 3.0, 10.0, 30.0, 100.0),
                    cg_sweep_ratios=(), cg_max_iter=50, curvature_sweep_ratios=(0.001, 0.01, 0.1, 1.0, 10.0),
                    sensitivity=(RetrainConfig(lr=1e-5, batch_size=32), RetrainConfig(epochs=10)), sensitivity_subsets=24)
QUICK = LdsConfig(num_train=240, num_inputs=12, num_subsets=16, fraction=0.5,
                  retrain=RetrainConfig(epochs=3, batch_size=16, lr=1e-3), slow_inputs=4, cg_inputs=4, lissa_depth=60,
                  sweep_ratios=(1.0, 10.0), cg_sweep_ratios=(1.0,), cg_max_iter=50, curvature_sweep_ratios=(0.1,),
                  sensitivity=(RetrainConfig(epochs=3, batch_size=16, lr=3e-4),), sensitivity_subsets=8)


def entries(config: LdsConfig) -> list[Entry]:
    """The configurations measured: one table, easy to extend."""
    slow = config.slow_inputs
    cg = dict(solver="cg", curvature="gauss-newton", cg_max_iter=config.cg_max_iter)
    rows = [
        Entry("lds_default", "the engine's default, `SolverConfig()`: EK-FAC, λ per block 10 × its mean eigenvalue, "
              "the damped inverse at low rank to 1e-3 of its largest entry", SolverConfig()),
        Entry("lds_ekfac_exact_inverse", "the default with the damped inverse exactly (`inverse_rank_tolerance` 0)",
              SolverConfig(inverse_rank_tolerance=0.0)),
        Entry("lds_fastif_paper_config",
              f"FastIF's paper: LiSSA on the Hessian, damp 5e-3, scale 1e4 (λ = 50), depth {config.lissa_depth}, B 1",
              SolverConfig.fastif_paper(depth=config.lissa_depth), inputs=slow),
        Entry("lds_lissa_gauss_newton", f"LiSSA on Gauss-Newton, relative damping (ratio 0.1), depth {config.lissa_depth}, B 1",
              SolverConfig(solver="lissa", curvature="gauss-newton",
                           lissa=replace(SolverConfig().lissa, depth=config.lissa_depth, batch_size=1)),
              inputs=max(1, slow // 2)),
        Entry("lds_cg_gauss_newton", f"CG on Gauss-Newton, λ = 0.1 × mean eigenvalue, at most {config.cg_max_iter} iterations",
              SolverConfig(**cg), inputs=config.cg_inputs),
        Entry("lds_ekfac", "EK-FAC (Gauss-Newton), λ = 0.1 × the whole curvature's mean eigenvalue",
              SolverConfig(solver="ekfac", damping_scope="curvature")),
        Entry("lds_kfac", "K-FAC (Gauss-Newton), λ per block 10 × its mean eigenvalue", SolverConfig(solver="kfac")),
        Entry("lds_graddot", "identity: a plain gradient dot product", SolverConfig(solver="identity")),
    ]
    for ratio in config.sweep_ratios:
        rows.append(Entry(f"sweep_ekfac_{ratio:g}", f"EK-FAC, λ per block {ratio:g} × its mean eigenvalue",
                          SolverConfig(solver="ekfac", damping_scope="block", damping_ratio=ratio), group="sweep"))
    for ratio in config.curvature_sweep_ratios:
        rows.append(Entry(f"sweep_ekfac_curvature_{ratio:g}", f"EK-FAC, λ = {ratio:g} × the whole curvature's mean eigenvalue",
                          SolverConfig(solver="ekfac", damping_scope="curvature", damping_ratio=ratio), group="sweep"))
    for ratio in config.cg_sweep_ratios:
        rows.append(Entry(f"sweep_cg_{ratio:g}", f"CG (Gauss-Newton), damping_ratio {ratio:g}, at most {config.cg_max_iter} iterations",
                          SolverConfig(**cg, damping_ratio=ratio), inputs=config.cg_inputs, group="sweep"))
    return rows


def _identity(solver: Any) -> str:
    return json.dumps(_plain_config(solver), sort_keys=True)


def _plain_config(solver: Any) -> dict:
    value = asdict(solver) if hasattr(solver, "__dataclass_fields__") else dict(solver.__dict__)
    return {"type": type(solver).__name__, **value}


def _describe_solver(solver: Any) -> dict[str, Any]:
    plain = _plain_config(solver)
    return {k: plain.get(k) for k in ("solver", "curvature", "damping", "damping_ratio", "damping_scope") if k in plain}


# -- fitting, scoring, retraining ----------------------------------------------------------------------------
PREPARED = ("meta.json", "features.npy", "gradient_keys.npy", "prefix.npy", "prefix_offsets.npy")


def forget_fitted(engine: InfluenceEngine) -> list[str]:
    """Remove what the engine fitted after ``prepare`` (spectra, Kronecker factors) from its artefacts, so that
    the suite measures the fitting instead of loading a previous run's result."""
    removed = []
    folder = engine.artefact_dir
    if folder is not None and folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and path.name not in PREPARED and not path.name.startswith("index-"):
                path.unlink()
                removed.append(path.name)
    return removed


def fit_seconds(engine: InfluenceEngine, solver: Any, fitted: dict[str, float]) -> float:
    """Seconds of what ``solver`` needs fitted once per model (the curvature's spectrum, EK-FAC's factors).

    Timed here the first time it is needed and remembered in ``fitted``; a later
    configuration that needs the same thing reports the same cost (it is paid once per model).
    """
    needs = []
    if isinstance(solver, SolverConfig):
        # As fastif/curvature/solvers.py's solver_for: a relative λ (and LiSSA's derived knobs) need the spectrum.
        relative = solver.damping is None and not solver.lissa_absolute
        if (relative or (solver.solver == "lissa" and not solver.lissa_absolute)) and hasattr(engine, "spectrum"):
            needs.append(f"spectrum:{solver.curvature}")
        if solver.solver in ("ekfac", "kfac") and hasattr(engine, "factors"):
            needs.append("factors")
    total = 0.0
    for need in needs:
        if need not in fitted:
            clock = Clock()
            if need == "factors":
                engine.factors()
            else:
                engine.spectrum(need.split(":", 1)[1])
            fitted[need] = clock.seconds
        total += fitted[need]
    return total


def score_entry(engine: InfluenceEngine, queries: list[Query], solver: Any) -> tuple[np.ndarray, dict]:
    """Scores [q, N] of every training example for ``queries``, and the timing and the solver's own account."""
    from fastif.quality import score_matrix

    clock = Clock()
    _, influences = engine.analyze(queries, k=None, solver=solver)
    seconds = clock.seconds
    first = influences[0]
    info = {"seconds": seconds, "seconds_per_query": seconds / len(queries),
            "stages": {k: float(v) for k, v in first.seconds.items()},
            "converged": all(bool(i.converged) for i in influences),
            "solver_account": dict(getattr(first, "solver", {}) or {})}
    return score_matrix(influences, engine.num_train), info


def cached_losses(engine: InfluenceEngine, folder: Path, subsets: np.ndarray, queries: list[Query],
                  config: RetrainConfig, progress) -> tuple[np.ndarray, np.ndarray, dict]:
    """``retrained_test_losses`` (and the losses at θ₀), kept in ``folder`` keyed by everything they depend on."""
    from fastif.quality import eval_losses, initial_parameters

    key = hashlib.sha256(json.dumps({"fingerprint": engine.fingerprint, "retrain": asdict(config),
                                     "subsets": hashlib.sha256(np.packbits(subsets).tobytes()).hexdigest(),
                                     "inputs": [[q.text, q.label] for q in queries]}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = folder / f"losses-{key}.npz"
    evals = eval_set(engine, queries)
    base = eval_losses(engine, initial_parameters(engine), evals)
    if path.is_file():
        stored = np.load(path)
        log(f"retrained losses reused from {path}")
        return stored["losses"], base, {"cached": True, "seconds_per_retraining": float(stored["seconds_per_retraining"])}
    task = progress.add_task("retraining subsets", total=len(subsets) * config.seeds)
    clock = Clock()
    losses = retrained_test_losses(engine, subsets, evals, config,
                                   on_progress=lambda _s, done, total: progress.update(task, completed=done) and False)
    per = clock.seconds / (len(subsets) * config.seeds)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, losses=losses, seconds_per_retraining=per)
    return losses, base, {"cached": False, "seconds_per_retraining": per}


# -- Kronfluence on the same model, examples, modules, inputs and subsets ------------------------------------
def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


class BertTop(torch.nn.Module):
    """The last BERT block (first token only), pooler and classifier of a fresh copy of the model, with every
    Linear called as a module so that Kronfluence's hooks see exactly the inputs that carry gradients: the
    keys and values of all tokens, the query, attention output and feed-forward of the first token."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        base = getattr(model, model.base_model_prefix)
        self.block = base.encoder.layer[len(base.encoder.layer) - 1]
        self.pooler = base.pooler
        self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attn = self.block.attention.self
        heads, size = attn.num_attention_heads, attn.attention_head_size
        batch, tokens, _ = hidden.shape
        first = hidden[:, :1]
        query = attn.query(first).view(batch, 1, heads, size).transpose(1, 2)
        key = attn.key(hidden).view(batch, tokens, heads, size).transpose(1, 2)
        value = attn.value(hidden).view(batch, tokens, heads, size).transpose(1, 2)
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        weights = torch.softmax(query @ key.transpose(-1, -2) * size**-0.5 + additive, dim=-1)
        context = (weights @ value).transpose(1, 2).reshape(batch, 1, heads * size)
        out = self.block.attention.output
        attended = out.LayerNorm(out.dense(context) + first)
        inner = self.block.intermediate.intermediate_act_fn(self.block.intermediate.dense(attended))
        last = self.block.output.LayerNorm(self.block.output.dense(inner) + attended)
        pooled = self.pooler.activation(self.pooler.dense(last[:, 0]))
        return self.classifier(pooled)


def _tracked_modules(engine: InfluenceEngine, top: BertTop) -> list[str] | None:
    """BertTop's names of the nn.Linear modules that own influence parameters; None if the params are not
    exactly the last block, pooler and classifier of a BERT model."""
    base = engine.model.base_model_prefix
    last = len(engine.stack.layers) - 1
    prefixes = {f"{base}.encoder.layer.{last}.": "block.", f"{base}.pooler.": "pooler.", "classifier.": "classifier."}
    owners = sorted({name.rsplit(".", 1)[0] for name in engine.names})
    names = []
    for owner in owners:
        mapped = next((new + owner[len(old):] for old, new in prefixes.items() if owner.startswith(old)), None)
        if mapped is None and owner == "classifier":
            mapped = "classifier"
        if mapped is None:
            return None
        module = dict(top.named_modules()).get(mapped)
        if module is None:
            return None
        if isinstance(module, torch.nn.Linear):
            names.append(mapped)
    return names


def kronfluence_scores(engine: InfluenceEngine, queries: list[Query], folder: Path,
                       strategies: tuple[str, ...] = ("ekfac", "kfac"), damping_factor: float | None = None) -> dict:
    """Kronfluence's pairwise scores, negated into the engine's sign (negative = helpful), per strategy.

    Kronfluence 1.x: ``prepare_model`` wraps the tracked modules of a fresh copy of the
    model's top, ``Analyzer.fit_all_factors`` fits the factors on all N training
    examples (true Fisher: labels sampled from the model), ``compute_pairwise_scores``
    scores them; ``damping_factor`` None is Kronfluence's heuristic (0.1 × the mean of
    each module's eigenvalues). Returns {strategy: {"scores", "fit_seconds", "score_seconds", ...}}.
    """
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from fastif.modeling import load_classifier

    if engine.prefix_store is None or engine.objective.top is None or engine.model.config.model_type != "bert":
        return {"skipped": "Kronfluence runs on the cached BERT top only"}
    top = BertTop(load_classifier(engine.classifier.path, "cpu").model).eval()
    tracked = _tracked_modules(engine, top)
    if not tracked:
        return {"skipped": "the influence parameters are not the last block, pooler and classifier"}
    batch, hidden = engine.training_batch(list(range(engine.num_train)))
    with torch.no_grad():
        check = slice(0, min(16, engine.num_train))
        theirs = top(hidden[check], batch.attention_mask[check])
        ours = engine.objective.logits(*_sliced(batch, hidden, check))
    agreement = float((theirs - ours).abs().max())
    if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4):
        return {"skipped": f"the Kronfluence copy of the top disagrees with the engine's logits by {agreement:.2e}"}
    encoded = engine.encode(queries)
    test_batch = _collated(engine, encoded)

    class Examples(torch.utils.data.Dataset):
        def __init__(self, hidden, mask, labels):
            self.hidden, self.mask, self.labels = hidden, mask, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.hidden[i], self.mask[i], self.labels[i]

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample: bool = False):
            hidden, mask, labels = batch
            logits = model(hidden, mask)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            hidden, mask, labels = batch
            return F.cross_entropy(model(hidden, mask), labels, reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            # None: every token counts. The bench's inputs are packed to exactly max_length tokens, so nothing is
            # padded; elsewhere padded positions would add their (zero-activation) bias column to the K/V factors.
            return None

    train_set = Examples(hidden, batch.attention_mask, batch.labels)
    query_set = Examples(*test_batch)
    task = Classification()
    model = prepare_model(top, task)
    folder.mkdir(parents=True, exist_ok=True)
    analyzer = Analyzer(analysis_name="lds", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(folder))
    results: dict[str, Any] = {"tracked_modules": tracked, "logit_agreement": agreement,
                               "damping_factor": "heuristic: 0.1 × mean eigenvalue per module" if damping_factor is None
                               else damping_factor}
    for strategy in strategies:
        torch.manual_seed(0)  # the sampled labels of the true Fisher
        clock = Clock()
        analyzer.fit_all_factors(factors_name=strategy, dataset=train_set, per_device_batch_size=32,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        fit = clock.seconds
        clock = Clock()
        analyzer.compute_pairwise_scores(scores_name=f"{strategy}-scores", factors_name=strategy, query_dataset=query_set,
                                         train_dataset=train_set, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=32,
                                         score_args=ScoreArguments(damping_factor=damping_factor), overwrite_output_dir=True)
        score = clock.seconds
        pairwise = analyzer.load_pairwise_scores(scores_name=f"{strategy}-scores")["all_modules"]
        results[strategy] = {"scores": -pairwise.double().numpy(), "fit_seconds": fit, "score_seconds": score,
                             "seconds_per_query": score / len(queries)}
    return results


def _sliced(batch, hidden, rows: slice):
    from fastif.encoding import Batch

    return (Batch(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                  token_type_ids=None if batch.token_type_ids is None else batch.token_type_ids[rows],
                  labels=batch.labels[rows]), hidden[rows])


def _collated(engine: InfluenceEngine, encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastif.encoding import collate

    rows = list(range(len(encoded.labels_used)))
    batch = collate(encoded.tokens, rows, engine.pad_id, engine.classifier.device)
    return encoded.hidden[:, : batch.input_ids.shape[1]], batch.attention_mask, batch.labels


# -- the suite ------------------------------------------------------------------------------------------------
def _row(entry_key: str, label: str, description: dict, result: LDSResult, inputs: int, fit: float | None,
         per_query: float | None, extra: dict | None = None) -> dict:
    return {"key": entry_key, "label": label, **description, "inputs": inputs, "lds": result.mean,
            "se": result.standard_error, "constant": result.constant, "per_input": list(result.per_input),
            "fit_seconds": fit, "seconds_per_query": per_query, **(extra or {})}


def run(setup, out: Path, config: LdsConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    num_train = min(config.num_train, setup.num_train)
    folder = lds_train_file(setup, num_train).parent
    with bars() as progress:
        engine = lds_engine(setup, num_train, engine_progress(progress))
        forgotten = forget_fitted(engine)
        queries = lds_inputs(setup, config.num_inputs)
        subsets = random_subsets(engine.num_train, config.num_subsets, config.fraction, config.seed)
        losses, base, retrain_info = cached_losses(engine, folder, subsets, queries, config.retrain, progress)
        noise = lds(np.zeros((len(queries), engine.num_train)), subsets, losses).retraining_noise
        mean_losses = losses.mean(axis=1)
        retraining = {**asdict(config.retrain), **retrain_info, "noise": noise,
                      "base_loss_mean": float(base.mean()),
                      "mean_abs_change_from_theta0": float(np.abs(mean_losses - base).mean()),
                      "std_over_subsets": float(mean_losses.std(axis=0).mean()),
                      "mean_abs_seed_difference": float(np.abs(losses[:, 0] - losses[:, -1]).mean())}
        log(f"retraining: {retrain_info['seconds_per_retraining']:.2f} s each, seed-to-seed Spearman {fmt(noise)}")

        rows: list[dict] = []
        failed: dict[str, str] = {}
        fitted: dict[str, float] = {}
        computed: dict[str, tuple[np.ndarray, dict, float]] = {}  # solver identity -> (scores, info, fit)
        default_scores = None
        task = progress.add_task("scoring configurations", total=len(entries(config)))
        for entry in entries(config):
            count = min(entry.inputs or len(queries), len(queries))
            identity = f"{_identity(entry.solver)}|{count}"
            try:
                if identity not in computed:
                    fit = fit_seconds(engine, entry.solver, fitted)
                    scores, info = score_entry(engine, queries[:count], entry.solver)
                    computed[identity] = (scores, info, fit)
                scores, info, fit = computed[identity]
            except Exception as err:  # one configuration failing (LiSSA diverging, ...) is a result, not a crash
                failed[entry.key] = f"{type(err).__name__}: {err}"
                log(f"[red]{entry.key} failed[/]: {failed[entry.key]}")
                progress.advance(task)
                continue
            if entry.key == "lds_default":
                default_scores = scores
            result = lds(scores, subsets, losses[:, :, :count])
            extra = {"group": entry.group, "converged": info["converged"], "stages": info["stages"],
                     "solver_account": info["solver_account"]}
            if count < len(queries) and default_scores is not None:
                extra["default_on_same_inputs"] = lds(default_scores[:count], subsets, losses[:, :, :count]).mean
            rows.append(_row(entry.key, entry.label, _describe_solver(entry.solver), result, count, fit or None,
                             info["seconds_per_query"], extra))
            progress.advance(task)

        kron: dict[str, Any] = {}
        if not config.kronfluence:
            kron = {"skipped": "not run in this configuration"}
        elif not kronfluence_available():
            kron = {"skipped": "kronfluence is not installed (pip install -e '.[bench]', see pyproject.toml)"}
        else:
            try:
                kron = kronfluence_scores(engine, queries, folder / "kronfluence")
            except Exception as err:
                kron = {"skipped": f"Kronfluence failed: {type(err).__name__}: {err}"}
            for strategy in ("ekfac", "kfac"):
                if strategy in kron:
                    part = kron[strategy]
                    result = lds(part["scores"], subsets, losses)
                    rows.append(_row(f"lds_kronfluence_{strategy}", f"Kronfluence {strategy.upper()}, damping "
                                     f"{kron['damping_factor']}", {"solver": f"kronfluence-{strategy}",
                                                                   "curvature": "true Fisher (sampled labels)"},
                                     result, len(queries), part["fit_seconds"], part["seconds_per_query"],
                                     {"group": "main", "score_seconds_all_inputs": part["score_seconds"]}))
                    if "lds_default" in {r["key"] for r in rows} and default_scores is not None:
                        rows[-1]["spearman_with_default_scores"] = float(np.mean([
                            _spearman(part["scores"][t], default_scores[t]) for t in range(len(queries))]))
            if "skipped" in kron:
                log(f"[yellow]Kronfluence skipped[/]: {kron['skipped']}")

        sensitivity = []
        full = [(r["key"], computed_scores) for r in rows if r["inputs"] == len(queries)
                for computed_scores in [_scores_of(r["key"], rows, computed, kron, entries(config), len(queries))]
                if computed_scores is not None]
        count = min(config.sensitivity_subsets, len(subsets))
        for other in config.sensitivity:
            other_losses, _, other_info = cached_losses(engine, folder, subsets[:count], queries, other, progress)
            other_noise = lds(np.zeros((len(queries), engine.num_train)), subsets[:count], other_losses).retraining_noise
            sensitivity.append({"retrain": asdict(other), "subsets": count, "noise": other_noise,
                                "seconds_per_retraining": other_info["seconds_per_retraining"],
                                "std_over_subsets": float(other_losses.mean(axis=1).std(axis=0).mean()),
                                "lds": {key: lds(scores, subsets[:count], other_losses).mean for key, scores in full},
                                "lds_default_retraining_same_subsets": {
                                    key: lds(scores, subsets[:count], losses[:count]).mean for key, scores in full}})

    by_key = {r["key"]: r for r in rows}
    headline: dict[str, Any] = {}
    for key in ("lds_default", "lds_fastif_paper_config", "lds_graddot", "lds_kronfluence_ekfac"):
        if key in by_key:
            headline[key] = round(by_key[key]["lds"], 4)
    if "lds_default" in by_key:
        headline["query_seconds_default"] = round(by_key["lds_default"]["seconds_per_query"], 4)
    if "lds_kronfluence_ekfac" in by_key:
        headline["query_seconds_kronfluence_ekfac"] = round(by_key["lds_kronfluence_ekfac"]["seconds_per_query"], 4)
    headline["retraining_noise"] = round(noise, 4) if noise is not None else None
    sweep = [r for r in rows if r["key"].startswith("sweep_ekfac_") and not r["key"].startswith("sweep_ekfac_curvature")]
    if sweep:
        best = max(sweep, key=lambda r: r["lds"])
        headline["best_ekfac_damping_ratio"] = best["damping_ratio"]

    data = {"config": {**{k: v for k, v in asdict(config).items() if k != "retrain"}, "num_train": engine.num_train,
                       "num_inputs": len(queries)},
            "retraining": retraining, "results": rows, "failed": failed, "sensitivity": sensitivity,
            "kronfluence": {k: v for k, v in kron.items() if k not in ("ekfac", "kfac")},
            "fitted_seconds": fitted, "forgotten_artefacts": forgotten, "suite_seconds": clock.seconds}
    write_results(out, "lds", headline, data, _markdown(setup, config, headline, data))
    return headline


def _scores_of(key: str, rows: list[dict], computed: dict, kron: dict, table_entries: list[Entry],
               count: int) -> np.ndarray | None:
    """The score matrix behind result ``key`` (an entry of the table, or Kronfluence's)."""
    if key.startswith("lds_kronfluence_"):
        part = kron.get(key.rsplit("_", 1)[1])
        return None if part is None else part["scores"]
    entry = next((e for e in table_entries if e.key == key), None)
    if entry is None:
        return None
    found = computed.get(f"{_identity(entry.solver)}|{min(entry.inputs or count, count)}")
    return None if found is None else found[0]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from fastif.quality import columnwise_spearman

    rho, _ = columnwise_spearman(np.asarray(a)[:, None], np.asarray(b)[:, None])
    return float(rho[0])


def _lds_cell(row: dict) -> str:
    return f"{row['lds']:.3f} ± {row['se']:.3f}"


def _damping_cell(row: dict) -> str:
    account = row.get("solver_account") or {}
    used = account.get("damping")
    if isinstance(used, (int, float)):
        return f"{used:.3g}"
    if row.get("damping") is not None:
        return f"{row['damping']:g}"
    if row.get("damping_ratio") is not None:
        return f"{row['damping_ratio']:g} × mean" + (" per block" if row.get("damping_scope") == "block" else "")
    return "–"


def _markdown(setup, config: LdsConfig, headline: dict, data: dict) -> str:
    rows, retraining = data["results"], data["retraining"]
    main = [r for r in rows if r.get("group") == "main"]
    sweep = [r for r in rows if r.get("group") == "sweep"]

    def line(r: dict) -> list:
        same = r.get("default_on_same_inputs")
        return [f"`{r['key']}`", r["label"], r["inputs"], _lds_cell(r), "–" if same is None else f"{same:.3f}",
                _damping_cell(r), r["fit_seconds"], r["seconds_per_query"],
                "–" if r.get("converged") is None else r["converged"]]

    headers = ["key", "configuration", "inputs", "LDS ± SE", "default, same inputs", "λ used", "fit s", "s / query",
               "converged"]
    kron = data["kronfluence"]
    kron_note = (f"Kronfluence: skipped ({kron['skipped']})." if "skipped" in kron else
                 f"Kronfluence tracks the nn.Linear modules of the influence parameters ({len(kron.get('tracked_modules', []))}: "
                 f"{', '.join(kron.get('tracked_modules', []))}); the LayerNorm parameters are not Linear and it leaves them out. "
                 f"Its copy of the top gives the engine's logits to {kron.get('logit_agreement', float('nan')):.1e}. "
                 "Its pairwise scores are negated into the engine's sign; its seconds per query are its scoring time over "
                 "all N training examples divided by the number of inputs.")
    failed = "".join(f"\n- `{k}` failed: {v}" for k, v in data["failed"].items())
    fitted = ", ".join(f"{k} {v:.1f} s" for k, v in data["fitted_seconds"].items()) or "nothing"
    r = retraining
    return f"""# lds: are the influence scores true? (linear datamodeling score)

Per test input: Spearman's ρ over {config.num_subsets} random half subsets S of the N = {data['config']['num_train']}
training examples between Σ_{{i∈S}} I(z_i, z_t) and the input's loss after retraining on S (fastif/quality/),
averaged over inputs (± its standard error). Scores have the engine's sign (negative = helpful), so scores that
predict retraining give a positive LDS; a plain gradient dot product is the floor to beat, and the retraining's
own reproducibility (the Spearman between two shuffling seeds) is roughly the ceiling.

{headline_block(headline)}

## Set-up
{setup_block(setup, [
    f"- training set: the first {data['config']['num_train']} examples of the bench's packed set; "
    f"{data['config']['num_inputs']} test inputs (gold labels) from the packed dev rows",
    f"- subsets: {config.num_subsets} of {config.fraction:g} × N examples each, seed {config.seed}; the same for every configuration",
    f"- scores: `engine.analyze(k=None, solver=…)` over all N examples; slow configurations score the first inputs "
    f"only ({config.slow_inputs} for LiSSA, {config.cg_inputs} for CG: their row says how many, next to the default's "
    "LDS on the same inputs)",
    f"- fitted once per model and timed here: {fitted} (a configuration's fit column counts what it needs)",
])}

## The retraining

Each subset is retrained {r['seeds']} times from the fine-tuned influence parameters θ₀ (a warm start: influence
functions predict how the optimum moves when examples are removed), training only the influence parameters on the
cached frozen-prefix activations, minimising the engine's own objective: {r['optimizer']} at lr {r['lr']:g}
({r['schedule']} schedule), {r['epochs']} epochs of batch {r['batch_size']}. One retraining takes
{r['seconds_per_retraining']:.2f} s{' (losses reused from an earlier run)' if r['cached'] else ''}.

- test loss at θ₀: {r['base_loss_mean']:.3f} on average; after retraining it moves by {r['mean_abs_change_from_theta0']:.3f}
  on average, its standard deviation over subsets is {r['std_over_subsets']:.3f}, and two seeds of one subset differ by
  {r['mean_abs_seed_difference']:.3f}
- retraining noise (Spearman between the seeds' losses over subsets, mean over inputs): **{fmt(r['noise'])}**

## Results

{table(headers, [line(r) for r in main])}

{kron_note}{failed}

## How much depends on the retraining

{_sensitivity_markdown(data["sensitivity"], retraining)}

## Damping sweep

The best default is the one that measures best. `sweep_ekfac_R`: each parameter block's λ is R × that block's
mean eigenvalue (`damping_scope` "block", the default scope of EK-FAC and K-FAC); `sweep_ekfac_curvature_R`: one λ,
R × the whole curvature's mean eigenvalue. For a per-block λ the "λ used" column is its mean over the parameters.

{table(headers, [line(r) for r in sweep]) if sweep else 'No sweep in this configuration.'}
"""


def _sensitivity_markdown(sensitivity: list[dict], retraining: dict) -> str:
    if not sensitivity:
        return "Not measured in this configuration."

    def name(r: dict) -> str:
        batch = "full batch" if r["batch_size"] is None else f"batch {r['batch_size']}"
        return f"{r['optimizer']} lr {r['lr']:g}, {r['epochs']} ep, {batch}, {r['schedule']}"

    keys = list(sensitivity[0]["lds"])
    headers = ["retraining", "s each", "noise", "spread", *[f"`{k}`" for k in keys]]
    lines = [[f"{name(retraining)} (the one above)", retraining["seconds_per_retraining"], retraining["noise"], "–",
              *[sensitivity[0]["lds_default_retraining_same_subsets"][k] for k in keys]]]
    for s in sensitivity:
        lines.append([name(s["retrain"]), s["seconds_per_retraining"], s["noise"], s["std_over_subsets"],
                      *[s["lds"][k] for k in keys]])
    return (f"The same scores against other retrainings of the first {sensitivity[0]['subsets']} subsets (noise: the "
            "seeds' agreement; spread: the loss's standard deviation over subsets, mean over inputs). Absolute LDS "
            "values depend on how far the retraining goes; compare configurations within a row.\n\n"
            + table(headers, lines))
