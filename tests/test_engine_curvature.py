"""Curvature and its solvers against explicit matrices on tiny models.

The reference is an independent float64 copy of the model (tests/tiny.py ``Reference``):
its Jacobian of the logits by ``torch.func.jacrev``, one example at a time, gives the
explicit Gauss-Newton matrix G = mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, against which
the engine's G·v, CG, the spectrum estimate, K-FAC and EK-FAC are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, Query
from fastif.config import SolverConfig
from fastif.curvature import EIGENVALUE_PARTS, FactorFit, KroneckerFactors
from tiny import Reference, assert_close, make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 30
TEST = [{"text": "the acting was superb but the plot dull", "label": "positive"},
        {"text": "really boring film", "label": "negative"},
        {"text": "quite a lovely story", "label": "positive"}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def explicit_ggn(ref: Reference, rows: list[dict], weight_decay: float = 0.0) -> torch.Tensor:
    """mean_i J_iᵀ H_out,i J_i (+ the L2 term's wd on decayed entries), J_i = ∂logits_i/∂θ by jacrev."""
    theta = ref.theta().clone()

    def logits_of(flat: torch.Tensor, row: dict) -> torch.Tensor:
        params, start = {}, 0
        for name, p in zip(ref.names, ref.params):
            params[name] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return ref.logits(row["text"], row.get("text_pair"), params)

    total = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for row in rows:
        jac = torch.func.jacrev(lambda f: logits_of(f, row))(theta)  # [C, P]
        p = torch.softmax(logits_of(theta, row).detach(), dim=-1)
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    ggn = total / len(rows)
    if weight_decay:
        mask = torch.cat([torch.full((p.numel(),), float(d), dtype=torch.float64) for p, d in zip(ref.params, ref.decay)])
        ggn += torch.diag(weight_decay * mask)
    return ggn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("curvature")
    model = make_tiny_family(root / "model", "bert", seed=3, initializer_range=0.3, layers=2)
    rows = sentences(NUM_TRAIN, seed=5, noise=0.15)
    return model, write_jsonl(root / "train.jsonl", rows), rows, root


def engine_of(files, params="auto", weight_decay: float = 0.0, artefacts: bool = False) -> InfluenceEngine:
    model, train, _, root = files
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(params=params, weight_decay=weight_decay),
                                        device="cpu", artefact_dir=root / "artefacts" if artefacts else None)
    engine.prepare()
    return engine


@pytest.fixture(scope="module", params=[0.0, 0.1], ids=["no-decay", "weight-decay"])
def top(request, files):
    """The auto influence parameters (last block, pooler, head) on the fast path, and the explicit G."""
    engine = engine_of(files, weight_decay=request.param)
    assert engine.factored is not None and engine.objective.top is not None  # the folded, factored path is on
    ref = Reference(files[0], engine.names, weight_decay=request.param)
    return engine, ref, explicit_ggn(ref, files[2], request.param)


def test_ggn_vector_product_equals_explicit_jacobian_form(top):
    engine, ref, ggn = top
    vectors = torch.randn(3, engine.num_params, generator=torch.Generator().manual_seed(1))
    actual = engine.full_hvp(vectors, batch_size=7, curvature="gauss-newton")
    for row in range(3):
        assert_close(actual[row], ggn @ vectors[row].double(), rtol=1e-5)


def test_ggn_is_positive_semidefinite_and_differs_from_the_hessian(top, files):
    engine, ref, ggn = top
    assert float(torch.linalg.eigvalsh(ggn)[0]) > -1e-9
    # H·v by the reference's double backward (no explicit Hessian: it would cost P backward passes)
    vector = torch.randn(engine.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hessian_v = ref.hvp(files[2], vector)
    assert float((hessian_v - ggn @ vector).norm()) > 1e-3 * float((ggn @ vector).norm())  # the choice matters


@pytest.mark.parametrize("damping", [1e-3, 1e-1, 10.0])
def test_cg_on_the_ggn_converges_for_every_positive_damping(top, damping):
    engine, ref, ggn = top
    grads = ref.gradients(TEST[:1])
    config = SolverConfig(solver="cg", curvature="gauss-newton", damping=damping, cg_tol=1e-6, cg_max_iter=2000)
    solution = engine.solve(grads.float(), config)
    assert solution.converged and solution.solver == "cg" and solution.residual <= 1e-6
    expected = torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), grads[0])
    assert_close(solution.vectors[0], expected, rtol=2e-3)


def test_spectrum_largest_eigenvalue_within_five_percent(top):
    engine, ref, ggn = top
    spectrum = engine.spectrum("gauss-newton")  # NUM_TRAIN < the sample size: over the whole set
    eigenvalues = torch.linalg.eigvalsh(ggn)
    assert abs(spectrum.largest - float(eigenvalues[-1])) <= 0.05 * float(eigenvalues[-1])
    # Hutchinson's trace: within four of its own standard errors of the exact one
    assert abs(spectrum.trace - float(ggn.trace())) <= 4 * spectrum.trace_stderr + 1e-6
    assert spectrum.mean == pytest.approx(spectrum.trace / engine.num_params)


def test_relative_damping_is_a_multiple_of_the_mean_eigenvalue(top):
    engine, ref, ggn = top
    grads = ref.gradients(TEST[:1]).float()
    solution = engine.solve(grads, SolverConfig(solver="identity", damping_ratio=0.5))
    assert solution.damping == pytest.approx(0.5 * engine.spectrum("gauss-newton").mean)
    assert_close(solution.vectors[0], grads[0] / solution.damping, rtol=1e-6)


def test_kfac_on_a_lone_head_equals_the_explicit_kronecker_inverse(files):
    """With the classifier alone, K-FAC's block over [W | b] is (G ⊗ A + λI)⁻¹, with A over the inputs and a
    constant 1 (the bias's input) and G = E_y[(p − e_y)(p − e_y)ᵀ], both formed here by hand."""
    engine = engine_of(files, params=("classifier",))
    ref = Reference(files[0], engine.names)
    rows = files[2]
    damping = 0.05
    features, probs = [], []
    for row in rows:
        inputs = ref.encode(row["text"])
        with torch.no_grad():
            pooled = ref.model.bert(**inputs).pooler_output[0]
            features.append(torch.cat([pooled, torch.ones(1, dtype=pooled.dtype)]))
            probs.append(torch.softmax(ref.model.classifier(pooled), dim=-1))
    x, p = torch.stack(features), torch.stack(probs)  # [N, A + 1], [N, C]
    a = x.T @ x / len(rows)
    g = sum(torch.diag(pi) - torch.outer(pi, pi) for pi in p) / len(rows)
    vectors = torch.randn(2, engine.num_params, generator=torch.Generator().manual_seed(2))
    solution = engine.solve(vectors, SolverConfig(solver="kfac", damping=damping))
    classes, width = ref.params[0].shape
    factors = engine.factors()
    assert factors.kronecker[0].bias == 1 and not factors.diagonal  # the bias joined its weight's block
    for row in range(2):
        w = vectors[row, : classes * width].double().reshape(classes, width)
        joint = torch.cat([w, vectors[row, classes * width:].double().unsqueeze(1)], dim=1)  # [C, A + 1]
        # vec over rows of [W | b]: V ↦ G V A, i.e. the matrix kron(G, A) on the row-major vec
        kron = torch.kron(g, a) + damping * torch.eye(classes * (width + 1), dtype=torch.float64)
        expected = torch.linalg.solve(kron, joint.reshape(-1)).reshape(classes, width + 1)
        assert_close(solution.vectors[row], torch.cat([expected[:, :-1].reshape(-1), expected[:, -1]]), rtol=1e-4)


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """A tiny BERT at BERT's own initialisation scale (0.02), where layers are nearly independent.

    At the 0.3 scale of the other fixtures even the exact block-diagonal Gauss-Newton
    inverse ranks at only about 0.55 against the full one (measured), so no per-layer
    method could pass; at 0.02 the cross-layer terms are small, as in trained encoders.
    """
    root = tmp_path_factory.mktemp("standard")
    model = make_tiny_family(root / "model", "bert", seed=3, initializer_range=0.02, layers=2)
    rows = sentences(NUM_TRAIN, seed=5, noise=0.15)
    files = (model, write_jsonl(root / "train.jsonl", rows), rows, root)
    engine = engine_of(files)
    ref = Reference(model, engine.names)
    return engine, ref, explicit_ggn(ref, rows), rows


def test_ekfac_ranks_like_the_explicit_ggn_inverse(standard):
    engine, ref, ggn, rows = standard
    damping = 0.1 * float(torch.diagonal(ggn).mean())
    train_grads = ref.gradients(rows)
    test_grads = ref.gradients(TEST)
    exact = -(train_grads @ torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), test_grads.T)).T
    _, influences = engine.analyze([Query(t["text"], label=t["label"]) for t in TEST], k=None,
                                   solver=SolverConfig(solver="ekfac", damping=damping))
    graddot = -(train_grads @ test_grads.T).T
    for row, influence in enumerate(influences):
        assert influence.solver["solver"] == "ekfac" and influence.solver["converged"]
        rho = spearmanr(influence.scores, exact[row].numpy()).statistic
        assert rho >= 0.9, rho
        # and it is closer to the exact inverse than a plain gradient dot product
        assert rho > spearmanr(graddot[row].numpy(), exact[row].numpy()).statistic


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    """A three-label classifier: the fit's expectation over labels takes two backward passes (C − 1), not one."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("three-labels")
    folder = make_tiny_family(root / "model", "bert", seed=3, initializer_range=0.3, layers=2)
    names = ["negative", "neutral", "positive"]
    torch.manual_seed(4)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=3, id2label=dict(enumerate(names)),
                                                          label2id={n: i for i, n in enumerate(names)},
                                                          ignore_mismatched_sizes=True)
    model.save_pretrained(folder)
    rows = [{**row, "label": "neutral"} if i % 3 == 0 else row for i, row in enumerate(sentences(NUM_TRAIN, seed=5))]
    files = (folder, write_jsonl(root / "train.jsonl", rows), rows, root)
    engine = engine_of(files)
    assert engine.classifier.labels == names
    return engine, explicit_ggn(Reference(folder, engine.names), rows)


def test_ekfac_eigenvalues_are_the_exact_diagonal_in_its_basis(top):
    """Per Kronecker block ([W | b] where the bias joined), Λ = diag((Q_G ⊗ Q_A)ᵀ G_block (Q_G ⊗ Q_A)) of the explicit
    G; the diagonal blocks (LayerNorm, the key bias) equal diag(G)."""
    engine, ref, ggn = top
    assert_eigenvalues_are_the_exact_diagonal(engine, ggn)


def test_ekfac_with_three_labels_is_exact_in_its_basis_and_in_its_trace(three_labels):
    engine, ggn = three_labels
    assert_eigenvalues_are_the_exact_diagonal(engine, ggn)
    assert engine.factors().trace("ekfac") == pytest.approx(float(ggn.trace()), rel=1e-4)


def test_the_labels_expectation_is_rank_c_minus_one():
    """Σ_k d_k d_kᵀ = diag p − p pᵀ from C − 1 directions, for peaked, flat and certain predictions."""
    from fastif.curvature.kfac_fit import _logit_directions

    generator = torch.Generator().manual_seed(0)
    for classes in (2, 3, 5):
        logits = torch.randn(6, classes, generator=generator, dtype=torch.float64) * 4
        probs = torch.cat([torch.softmax(logits, dim=-1), torch.full((1, classes), 1 / classes, dtype=torch.float64),
                           torch.eye(classes, dtype=torch.float64)[:1]])
        directions = _logit_directions(probs)
        assert directions.shape == (len(probs), classes, classes - 1)
        expected = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        torch.testing.assert_close(directions @ directions.transpose(-1, -2), expected, atol=1e-12, rtol=1e-10)


def assert_eigenvalues_are_the_exact_diagonal(engine: InfluenceEngine, ggn: torch.Tensor) -> None:
    factors = engine.factors()
    starts = np.cumsum([0, *engine.objective.sizes])
    decay = torch.cat([torch.full((size,), d, dtype=torch.float64) for size, d in zip(engine.objective.sizes, engine.curvature.decay)])
    plain = ggn - torch.diag(decay)  # the factors hold G alone, without the L2 term
    floor = 1e-6 * float(torch.diagonal(ggn).max())  # the key bias's gradient is exactly 0 (softmax ignores it)
    for position, fitted in factors.kronecker.items():
        out, width = engine.objective.shapes[position]
        flat = torch.arange(starts[position], starts[position + 1]).reshape(out, width)
        if fitted.bias is not None:  # the joined bias is the last input column
            bias = torch.arange(starts[fitted.bias], starts[fitted.bias + 1]).reshape(out, 1)
            flat = torch.cat([flat, bias], dim=1)
        block = plain[flat.reshape(-1)][:, flat.reshape(-1)]
        basis = torch.kron(fitted.q_g.double(), fitted.q_a.double())
        np.testing.assert_allclose(fitted.corrected.reshape(-1).double().numpy(),
                                   torch.diagonal(basis.T @ block @ basis).numpy(), rtol=1e-4, atol=floor)
    for position, values in factors.diagonal.items():
        sl = slice(starts[position], starts[position + 1])
        np.testing.assert_allclose(values.reshape(-1).double().numpy(), torch.diagonal(plain[sl, sl]).numpy(),
                                   rtol=1e-4, atol=floor)
    joined = {b.bias for b in factors.kronecker.values() if b.bias is not None}
    assert set(factors.kronecker) | set(factors.diagonal) | joined == set(range(len(engine.names)))
    assert all(not engine.names[pos].endswith("LayerNorm.weight") for pos in joined)
    assert len(joined) == sum(1 for n in engine.names if n.endswith(".bias") and "LayerNorm" not in n and "key" not in n)


def engine_train_rows(engine: InfluenceEngine) -> list[dict]:
    labels = engine.classifier.labels
    return [{"text": ex.text, "label": labels[ex.label]} for ex in engine.train]


def test_ekfac_trace_is_the_exact_diagonal_trace(top):
    """EK-FAC's eigenvalues are the exact second moments in its basis: their sum is tr(G) of the blocks."""
    engine, ref, ggn = top
    factors = engine.factors()
    assert not factors.uncovered
    decay = engine.objective.weight_decay * sum(p.numel() for p, d in zip(engine.objective.params, engine.objective.decay) if d)
    assert factors.trace("ekfac") + decay == pytest.approx(float(ggn.trace()), rel=1e-4)


def test_factors_saved_and_loaded_give_identical_scores(files, monkeypatch):
    first = engine_of(files, artefacts=True)
    queries = [Query(t["text"], label=t["label"]) for t in TEST]
    config = SolverConfig(solver="ekfac", damping=0.01)
    _, before = first.analyze(queries, k=None, solver=config)
    path = first.artefact_dir / "ekfac.safetensors"
    assert path.is_file()
    loaded = KroneckerFactors.load(path)
    assert loaded is not None and loaded.names == first.names
    second = engine_of(files, artefacts=True)

    def refit(*args, **kwargs):
        raise AssertionError("the stored factors were fitted again instead of loaded")

    monkeypatch.setattr("fastif.curvature.training.FactorFit.bases", refit)  # loaded, not refitted: same numbers bit for bit
    _, after = second.analyze(queries, k=None, solver=config)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_bad_solver_configs_are_refused(files):
    with pytest.raises(ValueError, match="unknown solver"):
        SolverConfig(solver="newton")
    with pytest.raises(ValueError, match="unknown curvature"):
        SolverConfig(curvature="fisher-ish")
    engine = engine_of(files, params=("classifier",))
    with pytest.raises(ValueError, match="Gauss-Newton"):
        engine.solve(torch.zeros(1, engine.num_params), SolverConfig(solver="ekfac", curvature="hessian"))


def test_lissa_at_derived_knobs_restarts_at_a_larger_scale_instead_of_diverging(top):
    """A scale below a sampled example's curvature diverges; at derived knobs LiSSA restarts at 10× and still
    converges to (G + λI)⁻¹ v, while knobs given exactly fail with the error that says which knob to turn."""
    import dataclasses

    from fastif import LissaDivergedError
    from fastif.curvature.solvers import LissaSolver

    engine, ref, ggn = top
    grads = ref.gradients(TEST[:1]).float()
    damping = 0.5
    lissa = dataclasses.replace(SolverConfig().lissa, depth=3000, batch_size=1)
    base = engine.curvature.batch_product("gauss-newton")
    low = float(torch.linalg.eigvalsh(ggn)[-1]) / 20  # far below the largest eigenvalue: diverges at first
    knobs = dataclasses.replace(lissa, damp=damping / low, scale=low)
    with pytest.raises(LissaDivergedError):
        LissaSolver(base, engine.num_train, knobs).solve(grads)
    solution = LissaSolver(base, engine.num_train, knobs, retries=3).solve(grads)
    assert solution.retries >= 1 and solution.scale == pytest.approx(low * 10**solution.retries)
    expected = torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), grads[0].double())
    assert float((solution.vectors[0].double() - expected).norm() / expected.norm()) < 0.2  # a stochastic estimate


def test_per_block_damping_is_each_blocks_mean_eigenvalue_times_the_ratio(top):
    """damping_scope "block": (G_b + ratio · mean(Λ_b) I)⁻¹ per block, checked on the classifier's joined [W | b] block."""
    engine, ref, ggn = top
    factors = engine.factors()
    grads = ref.gradients(TEST[:1]).float()
    solution = engine.solve(grads, SolverConfig(solver="ekfac", damping_scope="block", damping_ratio=2.0))
    position = engine.names.index("classifier.weight")
    block = factors.kronecker[position]
    assert block.bias == engine.names.index("classifier.bias")
    starts = np.cumsum([0, *engine.objective.sizes])
    w = grads[0, starts[position]:starts[position + 1]].reshape(engine.objective.shapes[position])
    joint = torch.cat([w, grads[0, starts[block.bias]:starts[block.bias + 1]].unsqueeze(1)], dim=1).double()
    lam = 2.0 * float(block.corrected.double().mean()) + engine.curvature.decay[position]
    qg, qa = block.q_g.double(), block.q_a.double()
    expected = qg @ ((qg.T @ joint @ qa) / (block.corrected.double() + lam)) @ qa.T
    got = solution.vectors[0]
    assert_close(got[starts[position]:starts[position + 1]], expected[:, :-1].reshape(-1), rtol=1e-4)
    assert_close(got[starts[block.bias]:starts[block.bias + 1]], expected[:, -1], rtol=1e-4)
    with pytest.raises(ValueError, match="block"):
        SolverConfig(solver="cg", damping_scope="block")


def test_the_api_and_the_engine_default_alike():
    from api_schemas import InfluenceRequest
    from api_schemas.influence import DEFAULT_DAMPING_RATIO, DEFAULT_INVERSE_RANK_TOLERANCE
    from fastif.config import DEFAULT_DAMPING_RATIO as ENGINE_RATIO
    from fastif.config import DEFAULT_INVERSE_RANK_TOLERANCE as ENGINE_TOLERANCE
    from workers.configs import solver_config

    assert DEFAULT_DAMPING_RATIO == ENGINE_RATIO and DEFAULT_INVERSE_RANK_TOLERANCE == ENGINE_TOLERANCE
    for solver in ("ekfac", "kfac", "lissa", "cg", "identity"):
        request = InfluenceRequest.model_validate({"model_id": "m", "inputs": [{"text": "a"}], "solver": solver})
        assert solver_config(request) == SolverConfig(solver=solver, lissa=solver_config(request).lissa)
    exact = InfluenceRequest.model_validate({"model_id": "m", "inputs": [{"text": "a"}], "inverse_rank_tolerance": 0})
    assert solver_config(exact).inverse_rank_tolerance == 0.0
    for bad in (-0.1, 1.0, "a lot"):
        with pytest.raises(ValueError, match="inverse_rank_tolerance"):
            InfluenceRequest.model_validate({"model_id": "m", "inputs": [{"text": "a"}], "inverse_rank_tolerance": bad})


@pytest.mark.parametrize("tokens", [1, 5])
def test_the_fits_batch_sums_equal_a_naive_loop_over_examples(tokens):
    """K-FAC's weighted Gram matrices and EK-FAC's rotated second moments, against per-example loops
    (one token per example takes the closed form for outer products)."""
    from fastif.curvature.kfac_fit import _rotated_second_moment, _weighted_gram

    generator = torch.Generator().manual_seed(tokens)
    left, right = torch.randn(6, tokens, 4, generator=generator), torch.randn(6, tokens, 3, generator=generator)
    weight = torch.rand(6, generator=generator)
    gram = sum(weight[n] * sum(torch.outer(right[n, t], right[n, t]) for t in range(tokens)) for n in range(6))
    torch.testing.assert_close(_weighted_gram(right, weight), gram)
    moment = sum(weight[n] * (sum(torch.outer(left[n, t], right[n, t]) for t in range(tokens)) ** 2) for n in range(6))
    torch.testing.assert_close(_rotated_second_moment(left, right, weight), moment)


def test_ekfac_fitted_in_parts_by_separate_engines_is_one_engines_fit(tmp_path, monkeypatch):
    """A build's workers share EK-FAC's fit over one artefact folder: one fits the bases, others the parts in any
    order, the last combines. The factors are those one engine fits alone, bit for bit; the steps' files go."""
    model = make_tiny_family(tmp_path / "model", "bert", seed=3, initializer_range=0.3, layers=2)
    train = write_jsonl(tmp_path / "train.jsonl", sentences(300, seed=6, noise=0.15))  # 5 batches: every part has one

    def engine(folder) -> InfluenceEngine:
        made = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(), device="cpu", artefact_dir=folder)
        made.prepare()
        return made

    alone = engine(None).factors()
    shared = tmp_path / "artefacts"
    first = engine(shared)
    first.fit_factor_bases()
    assert not first.combine_factors()
    steps = first.artefact_dir
    assert sorted(p.name for p in steps.glob("ekfac*")) == ["ekfac-bases.safetensors"]
    order = [3, 0, 2, 1]
    for part in order[:-1]:
        worker = engine(shared)
        worker.fit_eigenvalue_part(part)
        assert not worker.combine_factors()  # a part is missing
    monkeypatch.setattr(FactorFit, "bases", lambda *_a, **_k: pytest.fail("the stored bases were fitted again"))
    last = engine(shared)
    last.fit_eigenvalue_part(order[-1])
    assert last.combine_factors()
    assert sorted(p.name for p in steps.iterdir() if "ekfac" in p.name) == ["ekfac.safetensors"]  # no steps, no partials
    assert first.combine_factors()  # another process finds its steps gone and the factors saved
    for fitted in (last.factors(), engine(shared).factors()):
        assert fitted.examples == alone.examples == 300 and sorted(fitted.kronecker) == sorted(alone.kronecker)
        for position, block in alone.kronecker.items():
            for part in ("q_a", "eig_a", "q_g", "eig_g", "corrected"):
                assert torch.equal(getattr(fitted.kronecker[position], part), getattr(block, part)), part
        assert sorted(fitted.diagonal) == sorted(alone.diagonal)
        assert all(torch.equal(fitted.diagonal[p], d) for p, d in alone.diagonal.items())


def test_the_parts_of_the_fit_share_its_batches_out():
    for batches in (1, 4, 5, 11):
        fit = FactorFit(lambda *_: None, [], [], [], lambda number: None, batches)
        parts = [list(fit.part_batches(part)) for part in range(EIGENVALUE_PARTS)]
        assert sorted(sum(parts, [])) == list(range(batches))  # each batch in exactly one part
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # evenly
    with pytest.raises(ValueError, match="no eigenvalue part"):
        fit.part_batches(EIGENVALUE_PARTS)
