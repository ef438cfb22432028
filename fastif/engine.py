"""The engine's facade: one model, its training set, and FastIF's influence query.

The work is done by one object per stage, each complete when constructed:
``PreparedModel`` (fastif/prepared_model.py: parameters, fast forward paths, the
objective), ``ArtefactStore`` (fastif/artefacts.py: what a build keeps on disk),
``TrainingSetBuild`` (fastif/training_set.py: the build, in shards),
``TrainingCurvature`` (fastif/curvature/training.py: C·v, spectrum, EK-FAC factors),
``solver_for`` (fastif/curvature/solvers.py), ``knn`` and ``Scorer``
(fastif/scoring.py). Each step of a query is its own method so that a worker can
cache or distribute them (test gradients, s_test, candidates, scores); ``analyze``
runs them in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from . import knn
from .allocator import keep_freed_memory, release_freed_memory
from .artefacts import Artefacts, ArtefactStore
from .batches import TrainingBatches
from .config import DataSpec, IndexConfig, InfluenceSpec, SolverConfig
from .curvature import KroneckerFactors, Solution, Spectrum, solver_for
from .curvature.kfac import GradientFactors, RowFactors
from .curvature.solvers import CurvatureSource, KroneckerSolver
from .curvature.training import TrainingCurvature
from .data import Example, Examples, load_examples, texts_of
from .encoded import EncodedQueries, encode_queries, test_gradient_factors, test_gradients
from .encoding import Batch, Tokenized, collate, tokenize
from .errors import DataError
from .fingerprint import combine, file_digest, model_files_digest
from .knn import SearchQuery
from .modeling import Classifier, load_classifier
from .params import select_influence_params
from .prefix import PrefixStore
from .prepared_model import PreparedModel
from .progress import ProgressCallback, stage_callback
from .query import (Candidates, Influence, Query, QueryPlan, Solver, SolvedTests, TensorCache, feature_distances,
                    group_key, influences_of, query_key, solver_config, through_cache)
from .readahead import will_need_rows
from .scoring import Scorer
from .staged_build import StagedBuild
from .stored_set import StoredSet, open_set, save_set, set_folder
from .training_set import TrainingSetBuild

PROBE_EXAMPLES = 8  # the fast paths are checked on the two longest of the first this many training examples


@dataclass(frozen=True)
class _Stages:
    """The stage objects over the training set's batches: rebuilt once ``prepare`` has the cached prefix."""

    batches: TrainingBatches
    curvature: TrainingCurvature
    scorer: Scorer


class InfluenceEngine:
    """FastIF's influence query on one classifier and its training set.

    Building an engine changes the classifier's model object as fastif/prepared_model.py
    says (``requires_grad``, the last block's and the frozen blocks' ``forward``), never
    its weights or outputs.
    """

    def __init__(self, classifier: Classifier, train: Sequence[Example] | StoredSet,
                 spec: InfluenceSpec = InfluenceSpec(), index_config: IndexConfig = IndexConfig(),
                 artefact_dir: Path | None = None, data_digest: str = "", model_digest: str = "",
                 compile_hvp: bool = False):
        """``train``: examples, tokenised here; or a stored set, tokenised at ``spec.max_length`` by the classifier's
        tokenizer (``from_paths`` opens one, fastif/stored_set.py). ``data_digest`` and ``model_digest``: the
        training file's and the model files' digests where the caller has them (else computed here)."""
        keep_freed_memory()
        self.classifier = classifier
        self.model = classifier.model
        self.stored_set = train if isinstance(train, StoredSet) else None
        self.train = train.examples if isinstance(train, StoredSet) else Examples.of(train)
        self.spec = spec
        self.index_config = index_config
        texts, pairs = texts_of(self.train)
        self.tokens = train.tokens if isinstance(train, StoredSet) else tokenize(
            classifier.tokenizer, texts, pairs, self.train.labels, spec.max_length)
        self.pad_id = classifier.tokenizer.pad_token_id or 0
        probe = sorted(range(min(self.num_train, PROBE_EXAMPLES)), key=lambda i: -len(self.tokens.input_ids[i]))[:2]
        self.prepared = PreparedModel(classifier, select_influence_params(self.model, spec.params),
                                      collate(self.tokens, probe, self.pad_id, classifier.device), spec.weight_decay,
                                      spec.weight_decay_ignores, max(self.tokens.lengths) if compile_hvp else None)
        self.names, self.objective, self.factored = self.prepared.names, self.prepared.objective, self.prepared.factored
        self.stack, self.first_token, self.prefix = self.prepared.stack, self.prepared.first_token, self.prepared.prefix
        self.fingerprint = combine(
            model=model_digest or model_files_digest(classifier.path),
            params=self.names,
            weight_decay=spec.weight_decay,
            max_length=spec.max_length,
            data=data_digest or combine(texts=list(texts), pairs=list(pairs) if pairs is not None else None,
                                        labels=self.train.labels.tolist()),
            # Rounded activations give (slightly) other curvature and s_test: their own artefacts and caches.
            **({"prefix_dtype": index_config.prefix_dtype} if self._rounds_prefix(index_config) else {}),
        )
        release_freed_memory()  # what reading and tokenising the set freed (held otherwise, see keep_freed_memory)
        self.artefact_dir = Path(artefact_dir) / self.fingerprint if artefact_dir else None
        self.store = ArtefactStore(self.artefact_dir, self.fingerprint)
        self.build = TrainingSetBuild(self.prepared, self.tokens, self.pad_id, self.store, index_config, self.names)
        # The artefacts (fastif/artefacts.py): None until prepare() computes or loads them.
        self.features: np.ndarray | None = None
        self.gradient_keys: np.ndarray | None = None
        self.prefix_store: PrefixStore | None = None
        self.index: faiss.Index | None = None
        self._stages = self._stages_over(None)

    @classmethod
    def from_paths(cls, model_dir: str | Path, data: DataSpec, spec: InfluenceSpec = InfluenceSpec(),
                   index_config: IndexConfig = IndexConfig(), artefact_dir: Path | None = None,
                   device: str | None = None, compile_hvp: bool = False) -> InfluenceEngine:
        """With an ``artefact_dir``, the training set is read and tokenised once and then mapped from there by every
        process (fastif/stored_set.py)."""
        classifier = load_classifier(model_dir, device)
        if not Path(data.path).exists():
            raise DataError(f"{data.path}: no such file")
        digest, model = combine(file=file_digest(Path(data.path)), spec=data.__dict__), model_files_digest(classifier.path)
        if artefact_dir is None:
            train = load_examples(data, classifier.label2id)
        else:
            train = _stored_set(classifier, data, spec.max_length, digest, model, Path(artefact_dir))
        return cls(classifier, train, spec, index_config, artefact_dir, data_digest=digest, model_digest=model,
                   compile_hvp=compile_hvp)

    def _stages_over(self, prefix: PrefixStore | None, recompute: bool = False) -> _Stages:
        batches = TrainingBatches(self.tokens, self.pad_id, self.classifier.device, prefix,
                                  self.prepared.prefix_activations if recompute else None)
        # Before prepare() the curvature is only loaded from disk: fitted, it would miss the cached prefix.
        curvature = TrainingCurvature(self.objective, batches, self.store, self.prepared.factored,
                                      can_fit=self.index is not None)
        return _Stages(batches, curvature, Scorer(self.objective, batches, self.prepared.factored))

    def _rounds_prefix(self, config: IndexConfig) -> bool:
        return self.prefix is not None and config.prefix == "cached" and config.prefix_dtype != "float32"

    # -- what the stages hold, for callers that look inside ----------------------------
    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_params(self) -> int:
        return self.objective.num_params

    @property
    def curvature(self) -> CurvatureSource:
        return self._stages.curvature.source

    # -- the build (fastif/training_set.py) ------------------------------------------------
    def prepare(self, on_progress: ProgressCallback | None = None, batch_size: int = 64) -> None:
        """Features, gradient keys, prefix activations and the faiss index; loaded from disk when stored.

        A build writes them shard by shard into memory maps, so its memory does not grow with the
        training set, and resumes from the shards a stopped build wrote; other processes may write
        shards of the same build meanwhile (``encode_shard``), with the same result. Queries read
        them read-only.
        """
        if self.index is None:
            self._use(self.build.artefacts(on_progress, batch_size))

    def staged_build(self) -> StagedBuild:
        """This layout's build, staged in the artefact folder in shards any process may write (``encode_shard``)."""
        return self.build.staged()

    def bytes_on_disk(self) -> int:
        """What this model's artefacts take on disk: every layout and index kept for its fingerprint, and the stored
        training set they share with other fingerprints of the same data."""
        return self.store.bytes_on_disk() + (self.stored_set.bytes_on_disk() if self.stored_set is not None else 0)

    def built(self) -> bool:
        """Whether this layout's artefacts are stored complete (``prepare`` then only loads them)."""
        return self.build.stored() is not None

    def encode_shard(self, shard: int, on_progress: ProgressCallback | None = None, batch_size: int = 64) -> None:
        """Write shard ``shard`` of the staged build (rows ``staged_build().shards[shard]``) and mark it done."""
        self.build.encode_shard(shard, on_progress, batch_size)

    def finish_build(self) -> None:
        """Once every shard is written (by any process): the index over the staged vectors, all moved into place and
        loaded, as ``prepare`` would."""
        if self.index is None:
            self._use(self.build.finish())
            release_freed_memory()  # what building the index freed: the curvature's fit comes next, on this process

    def _use(self, artefacts: Artefacts) -> None:
        self.features, self.gradient_keys, self.prefix_store = artefacts.features, artefacts.gradient_keys, artefacts.prefix
        self.index = artefacts.index
        recompute = self.index_config.prefix == "recompute"
        self._stages = self._stages_over(artefacts.prefix, recompute and self.prefix is not None)

    def _require_prepared(self) -> None:
        if self.index is None:
            raise RuntimeError("call prepare() before querying")

    # -- the curvature ---------------------------------------------------------------------
    def training_batch(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        """Training examples ``indices`` as a padded batch, with their cached prefix activations (None if not cached)."""
        return self._stages.batches(indices)

    def hvp(self, indices: Sequence[int], vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H·v with H the Hessian of the mean loss over training examples ``indices`` (into ``out`` if given)."""
        return self._stages.curvature.vp("hessian", indices, vectors, out)

    def curvature_vp(self, curvature: str, indices: Sequence[int], vectors: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """C·v, C the ``curvature`` ("hessian" or "gauss-newton") of the mean loss over training examples ``indices``."""
        return self._stages.curvature.vp(curvature, indices, vectors, out)

    def full_hvp(self, vectors: torch.Tensor, batch_size: int = 64, curvature: str = "hessian",
                 indices: Sequence[int] | None = None) -> torch.Tensor:
        """C·v with C the curvature of the mean loss over the whole training set (or over ``indices``)."""
        return self._stages.curvature.full_vp(vectors, batch_size, curvature, indices)

    def spectrum(self, curvature: str = "gauss-newton") -> Spectrum:
        """Largest and mean eigenvalue of the curvature (L2 term included), estimated once and kept with the artefacts."""
        return self._stages.curvature.spectrum(curvature)

    def factors(self, on_progress: ProgressCallback | None = None) -> KroneckerFactors:
        """EK-FAC's factors of the Gauss-Newton matrix (fitted by fastif/curvature/kfac_fit.py) once and kept with the artefacts."""
        return self._stages.curvature.factors(on_progress)

    # EK-FAC's fit in steps that processes sharing the artefacts may split (the sharded build, workers/build.py):
    # the bases, then each of EIGENVALUE_PARTS parts; the process that finds every part saved combines them.
    def fit_factor_bases(self, on_progress: ProgressCallback | None = None) -> None:
        """Pass 1 of EK-FAC's fit (the eigenbases), fitted unless stored, and stored beside the artefacts."""
        self._stages.curvature.factor_bases(on_progress)

    def fit_eigenvalue_part(self, part: int, on_progress: ProgressCallback | None = None) -> None:
        """Part ``part`` of pass 2 (``EIGENVALUE_PARTS``), fitted unless stored, and stored; the bases too if missing."""
        self._stages.curvature.fit_eigenvalue_part(part, on_progress)

    def combine_factors(self) -> bool:
        """Whether EK-FAC's factors are stored: combined and saved now if every part is (see ``fit_eigenvalue_part``)."""
        return self._stages.curvature.combine_factors() is not None

    def curvature_stored(self) -> bool:
        """Whether the build's curvature (the Gauss-Newton spectrum and EK-FAC's factors) is on disk, by whoever measured it."""
        return self.store.has_curvature("gauss-newton", self.names)

    def solve(self, vectors: torch.Tensor, solver: Solver = SolverConfig(), on_progress: ProgressCallback | None = None,
              gradient_factors: Sequence[GradientFactors | None] | None = None) -> Solution:
        """s_test = (C + λI)⁻¹ v for each row of ``vectors``, by the solver ``solver`` names (fastif/curvature).

        EK-FAC and K-FAC rotate the rows' ``gradient_factors`` where given (``gradient_factors()``), and give each
        row's blocks of low rank as factors (``Solution.factors``): pass them to ``score_rows``.
        """
        self._require_prepared()
        vectors = vectors.to(self.classifier.device)
        inverse = solver_for(solver_config(solver), self.curvature)
        if isinstance(inverse, KroneckerSolver):
            return inverse.solve(vectors, stage_callback(on_progress, "s_test"), gradient_factors)
        return inverse.solve(vectors, stage_callback(on_progress, "s_test"))

    # -- the query, step by step ------------------------------------------------------
    def encode(self, queries: Sequence[Query]) -> EncodedQueries:
        """Predictions, the labels the gradients use, and kNN features of the test inputs."""
        return encode_queries(self.prepared, queries, self.spec.max_length, self.pad_id, self.index_config.space)

    def test_gradients(self, encoded: EncodedQueries, rows: Sequence[int] | None = None) -> torch.Tensor:
        """∇θ L(z_t) of each test input (or of ``rows`` of them) with its label used, [q, P] (fastif/encoded.py)."""
        return test_gradients(self.objective, encoded, self.pad_id, rows)

    def candidates(self, query: SearchQuery, k: int | None) -> Candidates:
        """The k nearest training examples to ``query`` in the index's space; every example when k is None or 0.

        The distances are L2 between first-token features, whatever space the index searches.
        """
        self._require_prepared()
        if not k or k >= self.num_train:
            return Candidates(indices=np.arange(self.num_train), distances=None)
        indices = knn.search(self.index, query.key, k)
        will_need_rows(self.features, indices)  # scattered rows of a mapped file: asked of the disk at once
        return Candidates(indices=indices, distances=feature_distances(self.features, indices, query.feature))

    def score(self, s_test: torch.Tensor, indices: Sequence[int], batch_size: int = 64,
              on_progress: ProgressCallback | None = None) -> np.ndarray:
        """I(z_i, z_t) = -⟨∇L(z_i), s_test⟩ for each training index."""
        return self.score_rows(s_test.unsqueeze(0), [indices], batch_size, on_progress)[0]

    def score_rows(self, s_tests: torch.Tensor, candidates: Sequence[Sequence[int]], batch_size: int = 64,
                   on_progress: ProgressCallback | None = None,
                   factors: Sequence[RowFactors | None] | None = None) -> list[np.ndarray]:
        """The scores of each row of ``s_tests`` [m, P] on its own training indices (fastif/scoring.py); ``factors``:
        the rows' blocks of low rank (``Solution.factors``), through which their candidates are contracted for less."""
        self._require_prepared()
        return self._stages.scorer.score_rows(s_tests, candidates, batch_size, on_progress, factors)

    def scores_by_jvp(self, s_test: torch.Tensor, indices: Sequence[int], batch_size: int = 64,
                      on_progress: ProgressCallback | None = None, tokens: Tokenized | None = None,
                      batch_of=None) -> np.ndarray:
        """-⟨∇L(z_i), s_test⟩ by batched JVPs; ``tokens`` and ``batch_of`` name another set than the training set."""
        return self._stages.scorer.scores_by_jvp(s_test, indices, batch_size, on_progress, tokens, batch_of)

    # -- everything at once -------------------------------------------------------------
    def plan(self, queries: Sequence[Query], group: bool = False, cache: TensorCache | None = None) -> QueryPlan:
        """Encode the inputs and take their test gradients: the vectors s_test is solved for."""
        clock = time.perf_counter()
        encoded = self.encode(queries)
        keys = [query_key(q, label) for q, label in zip(queries, encoded.labels_used)]
        grads, _ = through_cache(cache, "grad", keys, lambda missing: self.test_gradients(encoded, missing),
                                 self.classifier.device)
        if group:
            # The mean gradient's output-layer part is the mean of the inputs' gradient keys.
            vectors = grads.mean(dim=0, keepdim=True)
            search = [SearchQuery(key=encoded.search_keys.mean(axis=0), feature=encoded.features.mean(axis=0))]
            keys = [group_key(queries, encoded.labels_used)]
        else:
            vectors, search = grads, [encoded.search(row) for row in range(len(queries))]
        return QueryPlan(encoded, vectors, search, keys, {"gradients": time.perf_counter() - clock})

    def cached_s_test(
        self, plan: QueryPlan, solver: Solver, cache: TensorCache | None = None,
        on_progress: ProgressCallback | None = None, extra_key: dict | None = None,
    ) -> SolvedTests:
        """s_test of every row of the plan, from ``cache`` where present, with the solver's diagnostics, which rows
        came from the cache, and the low-rank factors of the rows solved now (``solve``; the cache holds s_test only).

        The diagnostics are the solver's own (``Solution.diagnostics``) for the rows it
        solved now; when every row came from the cache they say only which solver it was.
        """
        clock = time.perf_counter()
        config = solver_config(solver)
        solver_key = {**config.cache_identity(), **(extra_key or {})}
        diagnostics = {"solver": config.solver, "curvature": config.curvature, "converged": True}
        if config.damping is None:
            diagnostics.update(damping_scope=config.damping_scope, damping_ratio=config.damping_ratio)
        if config.solver in ("ekfac", "kfac"):
            diagnostics["inverse_rank_tolerance"] = config.inverse_rank_tolerance
        factors: list[RowFactors | None] = [None] * len(plan.keys)

        def solve(missing: list[int]) -> torch.Tensor:
            # All rows missing: the plan's own [q, P] tensor, not a copy (fresh pages cost about 0.6 ms per MiB).
            vectors = plan.vectors if len(missing) == len(plan.vectors) else plan.vectors[missing]
            solution = self.solve(vectors, config, on_progress, self.gradient_factors(plan, config, missing))
            diagnostics.update(solution.diagnostics())
            for row, found in zip(missing, solution.factors or []):
                factors[row] = found
            return solution.vectors

        stacked, missing = through_cache(cache, "s_test", [{**key, **solver_key} for key in plan.keys], solve,
                                         self.classifier.device)
        plan.seconds["s_test"] = time.perf_counter() - clock
        return SolvedTests(stacked, diagnostics, [i not in missing for i in range(len(plan.keys))], factors)

    def gradient_factors(self, plan: QueryPlan, solver: Solver, rows: Sequence[int]) -> list[GradientFactors] | None:
        """The factors of the test gradients of the plan's ``rows`` (fastif/encoded.py), for ``solve`` to rotate: where
        the solver is EK-FAC or K-FAC, on CPU (``solved_rows`` uses them there only), the scorer has per-example
        factors, and each row is one input's gradient (not a group's mean); else None."""
        factored, encoded = self.prepared.factored, plan.encoded
        if (solver_config(solver).solver not in ("ekfac", "kfac") or factored is None or encoded.hidden is None
                or self.classifier.device.type != "cpu"
                or len(plan.vectors) != len(encoded.labels_used)):
            return None
        return test_gradient_factors(factored, encoded, self.pad_id, rows)

    def influences(
        self, plan: QueryPlan, s_tests: torch.Tensor, k: int | None, diagnostics: dict | bool, cached: Sequence[bool],
        on_progress: ProgressCallback | None = None, factors: Sequence[RowFactors | None] | None = None,
    ) -> list[Influence]:
        """kNN candidates and their scores for every row of the plan (``factors``: as ``score_rows`` takes them)."""
        clock = time.perf_counter()
        found = [self.candidates(query, k) for query in plan.search]
        plan.seconds["knn"] = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = self.score_rows(s_tests, [f.indices for f in found], on_progress=on_progress, factors=factors)
        # Like gradients and s_test, kNN and scoring run for all rows at once: whole-job seconds.
        seconds = {**plan.seconds, "scoring": time.perf_counter() - clock}
        return influences_of(found, scores, s_tests, cached, diagnostics, seconds)

    def analyze(self, queries: Sequence[Query], k: int | None = 1000, solver: Solver = SolverConfig(), group: bool = False,
                cache: TensorCache | None = None,
                on_progress: ProgressCallback | None = None) -> tuple[EncodedQueries, list[Influence]]:
        """FastIF's query: s_test, kNN candidates, scores; one Influence per query (one for a group)."""
        self.prepare(on_progress)
        plan = self.plan(queries, group, cache)
        s_tests, diagnostics, cached, factors = self.cached_s_test(plan, solver, cache, on_progress)
        return plan.encoded, self.influences(plan, s_tests, k, diagnostics, cached, on_progress, factors)


def _stored_set(classifier: Classifier, data: DataSpec, max_length: int, data_digest: str, model_digest: str,
                artefact_dir: Path) -> StoredSet:
    """The training set of ``data`` as stored under ``artefact_dir``: read and tokenised here if nobody did yet."""
    folder = set_folder(artefact_dir, combine(data=data_digest, model=model_digest, max_length=max_length))
    stored = open_set(folder)
    if stored is None:
        examples = load_examples(data, classifier.label2id)
        texts, pairs = texts_of(examples)
        save_set(folder, examples, tokenize(classifier.tokenizer, texts, pairs, examples.labels, max_length))
        del examples, texts, pairs
        release_freed_memory()  # the set read and tokenised here is mapped from its files from now on
        stored = open_set(folder)
    return stored
