"""The engine's facade: one model, its training set, and FastIF's influence query.

Each step is its own method so that a worker can cache or distribute them
(test gradients, s_test, candidates, scores); ``analyze`` runs them in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import knn
from .allocator import keep_freed_memory
from .config import CGConfig, DataSpec, IndexConfig, InfluenceSpec, LissaConfig, SolverConfig
from .curvature import CurvatureSource, KroneckerFactors, Solution, Spectrum, estimate_spectrum, fit_factors, solver_for
from .data import Example, load_examples, resolve_label, texts_of
from .encoding import Batch, Tokenized, collate, length_batches, tokenize
from .errors import CancelledError
from .factored import FactoredScores
from .first_token import FirstTokenLastBlock
from .fingerprint import combine, file_digest, model_digest
from .knn import SearchQuery
from .modeling import Classifier, load_classifier, output_layer
from .objective import InfluenceObjective
from .params import find_layer_stack, first_influence_layer, freeze_all_but, select_influence_params
from .prefix import FrozenPrefix, PrefixStore, write_meta
from .progress import ProgressCallback
from .top import TopOfModel, head_of

Solver = SolverConfig | LissaConfig | CGConfig
ARTEFACT_VERSION = 2
SPECTRUM_EXAMPLES = 512  # the curvature's spectrum is estimated on this many training examples (a fixed sample)
FIT_EXAMPLES = 10_000  # EK-FAC's factors are fitted on at most this many (a fixed sample beyond that)


def solver_config(solver: Solver) -> SolverConfig:
    """The one solver config; a bare LissaConfig or CGConfig means that solver on the Hessian at its absolute λ."""
    if isinstance(solver, SolverConfig):
        return solver
    if isinstance(solver, LissaConfig):
        return SolverConfig(solver="lissa", curvature="hessian", damping=solver.damping, lissa=solver, lissa_absolute=True)
    return SolverConfig(solver="cg", curvature="hessian", damping=solver.damping, cg_tol=solver.tol, cg_max_iter=solver.max_iter)


@dataclass(frozen=True)
class Query:
    """A test input; ``label`` None means the model's own prediction."""

    text: str
    text_pair: str | None = None
    label: int | str | None = None


@dataclass
class EncodedQueries:
    """What one forward pass over the test inputs gives."""

    probs: np.ndarray  # [q, C]
    labels_used: list[int]
    features: np.ndarray  # [q, H]
    tokens: Tokenized
    search_keys: np.ndarray  # [q, D]: kNN keys in the index's space (fastif/knn.py)
    hidden: torch.Tensor | None = None  # [q, T, H]: the frozen prefix's output, when it is cached

    def search(self, row: int) -> SearchQuery:
        return SearchQuery(key=self.search_keys[row], feature=self.features[row])


@dataclass
class Captured:
    """What the model computes for a batch that the engine keeps (one forward pass, no gradients)."""

    logits: torch.Tensor  # [B, C]
    features: torch.Tensor  # [B, H]: first token of the last block's output
    head_inputs: torch.Tensor  # [B, A]: what the output layer reads
    hidden: torch.Tensor | None  # [B, T, H]: the frozen prefix's output, when it is cached


@dataclass
class EncodedSet:
    """Features, search keys and cached prefix activations of a whole set of labelled examples."""

    features: np.ndarray  # [N, H]
    gradient_keys: np.ndarray  # [N, (C-1)·A]
    prefix: PrefixStore | None


@dataclass
class QueryPlan:
    """The test side of a query: encoded inputs, the vectors to solve for, kNN query features."""

    encoded: EncodedQueries
    vectors: torch.Tensor  # [rows, P]: one per input, or one mean gradient for a group
    search: list[SearchQuery]  # the kNN query of each row
    keys: list[dict]  # cache identity of each row
    seconds: dict[str, float]


@dataclass
class Candidates:
    indices: np.ndarray  # train indices, nearest first
    distances: np.ndarray | None  # L2 feature distances, None when every example is scored


@dataclass
class Influence:
    """The influence result of one query (or one group of queries)."""

    indices: np.ndarray
    scores: np.ndarray  # I(z_i, z_t) = -⟨∇L(z_i), s_test⟩; negative = helpful
    distances: np.ndarray | None
    converged: bool
    s_test_norm: float
    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    solver: dict = field(default_factory=dict)  # the solver's own account: name, converged, iterations, damping, ...

    def ranked(self, top: int) -> tuple[list[int], list[int]]:
        """Positions into ``indices``: most helpful first (negative), most harmful first (positive)."""
        order = np.argsort(self.scores, kind="stable")
        helpful = [int(i) for i in order[:top] if self.scores[i] < 0]
        harmful = [int(i) for i in order[::-1][:top] if self.scores[i] > 0]
        return helpful, harmful


def feature_distances(features: np.ndarray, indices: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """L2 distances between ``feature`` and the features of ``indices``."""
    return np.sqrt(((features[indices].astype(np.float64) - feature) ** 2).sum(axis=1)).astype(np.float32)


class TensorCache(Protocol):
    """Where the caller keeps per-test gradients and s_test between queries (the workers: Redis)."""

    def get(self, kind: str, payload: dict) -> torch.Tensor | None: ...

    def put(self, kind: str, payload: dict, tensor: torch.Tensor) -> None: ...


def _stage(on_progress: ProgressCallback | None, stage: str):
    def on_step(done: int, total: int) -> bool:
        return bool(on_progress(stage, done, total)) if on_progress else False

    return on_step


class TrainingHVP:
    """H·v over sampled training examples as LiSSA calls it, with the compiled fused step when there is one."""

    def __init__(self, engine: InfluenceEngine):
        self.engine = engine

    def __call__(self, indices: Sequence[int], vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.engine.hvp(indices, vectors, out)

    def fused_step(self, indices: Sequence[int], h: torch.Tensor, vectors: torch.Tensor, damp: float, scale: float):
        objective = self.engine.objective
        if objective.compiled is None:
            return None
        batch, hidden = self.engine._batch(indices)
        if hidden is None:
            return None
        return objective.compiled.step(batch, hidden, h, vectors, objective.decay_hessian, damp, scale)


class InfluenceEngine:
    def __init__(
        self,
        classifier: Classifier,
        train: Sequence[Example],
        spec: InfluenceSpec = InfluenceSpec(),
        index_config: IndexConfig = IndexConfig(),
        artefact_dir: Path | None = None,
        data_digest: str = "",
        compile_hvp: bool = False,
    ):
        keep_freed_memory()
        self.classifier = classifier
        self.model = classifier.model
        self.train = list(train)
        self.spec = spec
        self.index_config = index_config
        self.names = select_influence_params(self.model, spec.params)
        freeze_all_but(self.model, self.names)
        self.stack = stack = find_layer_stack(self.model)
        first = first_influence_layer(self.model, stack, self.names)
        # Installed before the bypass, so that a bypassed last block returns its cache.
        self.first_token = FirstTokenLastBlock(stack.layers[len(stack.layers) - 1])
        self.prefix = FrozenPrefix(stack.layers, first) if first is not None and first >= 1 else None
        self.objective = InfluenceObjective(classifier, self.names, self.prefix, spec.weight_decay, spec.weight_decay_ignores)
        texts, pairs = texts_of(self.train)
        self.tokens = tokenize(classifier.tokenizer, texts, pairs, [ex.label for ex in self.train], spec.max_length)
        self.pad_id = classifier.tokenizer.pad_token_id or 0
        self.fingerprint = combine(
            model=model_digest(classifier.path),
            params=self.names,
            weight_decay=spec.weight_decay,
            max_length=spec.max_length,
            data=data_digest or combine(texts=texts, pairs=pairs, labels=[ex.label for ex in self.train]),
        )
        self.artefact_dir = Path(artefact_dir) / self.fingerprint if artefact_dir else None
        self.output_layer = output_layer(self.model)
        self.features: np.ndarray | None = None
        self.gradient_keys: np.ndarray | None = None
        self.prefix_store: PrefixStore | None = None
        self.index = None
        # Set by _check_top when scores can come from per-example factors (fastif/factored.py).
        self.factored: FactoredScores | None = None
        self._spectra: dict[str, Spectrum] = {}
        self._factors: KroneckerFactors | None = None
        self.curvature = CurvatureSource(
            num_train=self.num_train, batch_product=self._batch_product, full_product=self._full_product,
            spectrum=self.spectrum, factors=self.factors,
            decay=[self.objective.weight_decay * float(d) for d in self.objective.decay])
        if self.prefix is not None:
            self._learn_block_outputs()
        self._check_first_token()
        self._check_top()
        if compile_hvp and self.objective.top is not None:
            from .compiled import CompiledHVP  # imports torch's compiler stack: only when asked

            self.objective.compiled = CompiledHVP(self.objective.top, self.names, self.objective.params,
                                                  max(self.tokens.lengths), self.objective.autograd_hvp)

    @classmethod
    def from_paths(
        cls,
        model_dir: str | Path,
        data: DataSpec,
        spec: InfluenceSpec = InfluenceSpec(),
        index_config: IndexConfig = IndexConfig(),
        artefact_dir: Path | None = None,
        device: str | None = None,
        compile_hvp: bool = False,
    ) -> InfluenceEngine:
        classifier = load_classifier(model_dir, device)
        train = load_examples(data, classifier.label2id)
        digest = combine(file=file_digest(Path(data.path)), spec=data.__dict__)
        return cls(classifier, train, spec, index_config, artefact_dir, data_digest=digest, compile_hvp=compile_hvp)

    # -- set-up ---------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_params(self) -> int:
        return self.objective.num_params

    def _learn_block_outputs(self) -> None:
        """One tiny forward so the bypass knows whether blocks return tuples."""
        sink: list[torch.Tensor] = []
        batch = collate(self.tokens, [0], self.pad_id, self.classifier.device)
        with torch.no_grad(), self.prefix.capturing(sink):
            self.model(**batch.model_inputs())

    def _check_first_token(self) -> None:
        """Keep the first-token last block only if the head really reads nothing else."""
        if not self.first_token.supported:
            return
        indices = sorted(range(min(self.num_train, 8)), key=lambda i: -len(self.tokens.input_ids[i]))[:2]
        batch = collate(self.tokens, indices, self.pad_id, self.classifier.device)
        with torch.no_grad():
            fast = self.model(**batch.model_inputs()).logits
            self.first_token.enabled = False
            full = self.model(**batch.model_inputs()).logits
        self.first_token.enabled = bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-5))

    def _check_top(self) -> None:
        """Run cached activations straight into the last block and head, if that gives the model's own logits."""
        head = head_of(self.model)
        last = len(self.stack.layers) - 1
        if head is None or not self.first_token.enabled or self.prefix is None or self.prefix.first != last:
            return
        top = TopOfModel(self.model, self.stack.layers[last], head)
        indices = sorted(range(min(self.num_train, 8)), key=lambda i: -len(self.tokens.input_ids[i]))[:2]
        batch = collate(self.tokens, indices, self.pad_id, self.classifier.device)
        try:
            captured = self.capture(batch)
            full = captured.logits
            with torch.no_grad():
                fast = top(captured.hidden, batch.attention_mask)
        except (AttributeError, TypeError, RuntimeError):
            return  # a head of another shape than its family's usual one
        if fast.shape == full.shape and torch.allclose(fast, full, rtol=1e-4, atol=1e-5):
            self.objective.top = top
            self._check_factored(batch, captured.hidden)

    def _check_factored(self, batch: Batch, hidden: torch.Tensor) -> None:
        """Score from per-example factors (fastif/factored.py) if they give the JVPs' numbers."""
        owners = sorted({name.rsplit(".", 1)[0] for name in self.objective.names})
        factored = FactoredScores(self.objective.top, self.objective.params,
                                  [self.model.get_submodule(owner) for owner in owners])
        direction = torch.randn(self.num_params, generator=torch.Generator().manual_seed(0)).to(self.classifier.device)
        uses = factored.factors(batch, hidden)
        if not factored.covers(uses):
            return
        fast = factored.contract(uses, self.objective.unflatten(direction), torch.arange(len(batch)))
        reference = self.objective.directional_derivatives(batch, hidden, direction, with_l2=False)
        if torch.allclose(fast, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())):
            self.factored = factored

    def capture(self, batch: Batch) -> Captured:
        """Logits, first-token features, the output layer's inputs and (if cached) the frozen prefix's output."""
        sink: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        head_inputs: list[torch.Tensor] = []
        handles = [
            self.stack.layers[len(self.stack.layers) - 1].register_forward_hook(
                lambda _m, _a, out: features.append((out[0] if isinstance(out, tuple) else out)[:, 0].detach())),
            self.output_layer.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0].detach())),
        ]
        try:
            with torch.no_grad():
                if self.prefix is not None:
                    with self.prefix.capturing(sink):
                        logits = self.model(**batch.model_inputs()).logits
                else:
                    logits = self.model(**batch.model_inputs()).logits
        finally:
            for handle in handles:
                handle.remove()
        return Captured(logits=logits, features=features[0], head_inputs=head_inputs[-1].reshape(len(batch), -1),
                        hidden=sink[0] if sink else None)

    def encode_set(self, tokens: Tokenized, batch_size: int = 64, on_progress: ProgressCallback | None = None,
                   stage: str = "features") -> EncodedSet:
        """One forward pass per length bucket over labelled examples: features, gradient keys, prefix cache."""
        count = len(tokens)
        features = np.zeros((count, self.model.config.hidden_size), dtype=np.float32)
        probs = np.zeros((count, len(self.classifier.labels)), dtype=np.float64)
        head_inputs: np.ndarray | None = None
        rows: list[np.ndarray | None] = [None] * count
        done = 0
        for indices in length_batches(tokens.lengths, batch_size):
            batch = collate(tokens, indices, self.pad_id, self.classifier.device)
            captured = self.capture(batch)
            features[indices] = captured.features.float().cpu().numpy()
            probs[indices] = torch.softmax(captured.logits.double(), dim=-1).cpu().numpy()
            if head_inputs is None:
                head_inputs = np.zeros((count, captured.head_inputs.shape[1]), dtype=np.float32)
            head_inputs[indices] = captured.head_inputs.float().cpu().numpy()
            if captured.hidden is not None:
                for row, i in enumerate(indices):
                    rows[i] = captured.hidden[row, : len(tokens.input_ids[i])].float().cpu().numpy()
            done += len(indices)
            if on_progress and on_progress(stage, done, count):
                raise CancelledError(f"cancelled while computing {stage}")
        keys = knn.gradient_keys(probs, tokens.labels.numpy(), head_inputs)
        return EncodedSet(features=features, gradient_keys=keys,
                          prefix=PrefixStore.from_rows(rows) if self.prefix is not None else None)

    def search_vectors(self, encoded: EncodedSet | None = None) -> np.ndarray:
        """What the index holds for the training set (or ``encoded``): gradient keys or features."""
        features, keys = (self.features, self.gradient_keys) if encoded is None else (encoded.features, encoded.gradient_keys)
        return keys if self.index_config.space == "gradient" else features

    def prepare(self, on_progress: ProgressCallback | None = None, batch_size: int = 64) -> None:
        """Features, gradient keys, cached prefix activations and the faiss index; loaded from disk when present."""
        if self.index is not None:
            return
        if self._stored_artefacts():
            self._load_artefacts()
            return
        encoded = self.encode_set(self.tokens, batch_size, on_progress)
        self.features, self.gradient_keys, self.prefix_store = encoded.features, encoded.gradient_keys, encoded.prefix
        self.index = knn.build_index(self.search_vectors(), self.index_config)
        if self.artefact_dir is not None:
            self._save_artefacts()

    @property
    def _index_file(self) -> str:
        return f"index-{self.index_config.space}-{self.index_config.kind}.faiss"

    def _save_artefacts(self) -> None:
        folder = self.artefact_dir
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "features.npy", self.features)
        np.save(folder / "gradient_keys.npy", self.gradient_keys)
        if self.prefix_store is not None:
            self.prefix_store.save(folder)
        knn.save_index(self.index, folder / self._index_file)
        # meta.json last: its presence marks a complete set of artefacts.
        write_meta(folder, {"version": ARTEFACT_VERSION, "fingerprint": self.fingerprint, "num_train": self.num_train,
                            "params": self.names})

    def _stored_artefacts(self) -> bool:
        """A complete set for this fingerprint, written by this version (older sets are computed again)."""
        if self.artefact_dir is None or not (self.artefact_dir / "meta.json").is_file():
            return False
        meta = json.loads((self.artefact_dir / "meta.json").read_text())
        return meta.get("version") == ARTEFACT_VERSION and meta.get("fingerprint") == self.fingerprint

    def _load_artefacts(self) -> None:
        folder = self.artefact_dir
        self.features = np.load(folder / "features.npy")
        self.gradient_keys = np.load(folder / "gradient_keys.npy")
        self.prefix_store = PrefixStore.load(folder) if self.prefix is not None else None
        if (folder / self._index_file).is_file():
            self.index = knn.load_index(folder / self._index_file)
        else:  # the same model and data registered with another index: build it from the stored vectors
            self.index = knn.build_index(self.search_vectors(), self.index_config)
            knn.save_index(self.index, folder / self._index_file)

    # -- the query, step by step ------------------------------------------------------
    def encode(self, queries: Sequence[Query]) -> EncodedQueries:
        """Predictions, the labels the gradients use, and kNN features of the test inputs."""
        label2id = self.classifier.label2id
        given = [None if q.label is None else resolve_label(q.label, label2id, f"input {i}") for i, q in enumerate(queries)]
        pairs = [q.text_pair or "" for q in queries] if any(q.text_pair for q in queries) else None
        tokens = tokenize(self.classifier.tokenizer, [q.text for q in queries], pairs, [-1] * len(queries), self.spec.max_length)
        batch = collate(tokens, list(range(len(queries))), self.pad_id, self.classifier.device)
        captured = self.capture(batch)
        probs = torch.softmax(captured.logits.double(), dim=-1).cpu().numpy()
        labels_used = [g if g is not None else int(p.argmax()) for g, p in zip(given, probs)]
        tokens.labels = torch.as_tensor(labels_used, dtype=torch.long)
        keys = knn.gradient_keys(probs, np.asarray(labels_used), captured.head_inputs.float().cpu().numpy())
        features = captured.features.float().cpu().numpy()
        return EncodedQueries(probs=probs.astype(np.float32), labels_used=labels_used, features=features, tokens=tokens,
                              search_keys=keys if self.index_config.space == "gradient" else features,
                              hidden=captured.hidden)

    def test_gradients(self, encoded: EncodedQueries, rows: Sequence[int] | None = None) -> torch.Tensor:
        """∇θ L(z_t) of each test input (or of ``rows`` of them) with its label used, [q, P].

        From the frozen prefix's activations that encoding kept, where it is cached: the
        frozen layers then ran once for all inputs, batched, and each gradient runs the rest.
        """
        rows = range(len(encoded.labels_used)) if rows is None else rows
        grads = []
        for i in rows:
            batch = collate(encoded.tokens, [i], self.pad_id, self.classifier.device)
            hidden = None if encoded.hidden is None else encoded.hidden[i : i + 1, : batch.input_ids.shape[1]]
            grads.append(self.objective.gradient(batch, hidden))
        return torch.stack(grads)

    def training_batch(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        """Training examples ``indices`` as a padded batch, with their cached prefix activations (None if not cached)."""
        return self._batch(indices)

    def _batch(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor | None]:
        batch = collate(self.tokens, indices, self.pad_id, self.classifier.device)
        hidden = self.prefix_store.gather_batch(indices, batch) if self.prefix_store is not None else None
        return batch, hidden

    def hvp(self, indices: Sequence[int], vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H·v with H the Hessian of the mean loss over training examples ``indices`` (into ``out`` if given)."""
        batch, hidden = self._batch(indices)
        return self.objective.hvp(batch, hidden, vectors, out)

    def curvature_vp(self, curvature: str, indices: Sequence[int], vectors: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """C·v, C the ``curvature`` ("hessian" or "gauss-newton") of the mean loss over training examples ``indices``."""
        batch, hidden = self._batch(indices)
        return self.objective.curvature_vp(curvature, batch, hidden, vectors, out)

    def full_hvp(self, vectors: torch.Tensor, batch_size: int = 64, curvature: str = "hessian",
                 indices: Sequence[int] | None = None) -> torch.Tensor:
        """C·v with C the curvature of the mean loss over the whole training set (or over ``indices``)."""
        total = torch.zeros_like(vectors)
        tokens = self.tokens.lengths if indices is None else [self.tokens.lengths[i] for i in indices]
        count = len(tokens)
        for chunk in length_batches(tokens, batch_size):
            members = chunk if indices is None else [indices[c] for c in chunk]
            total += self.curvature_vp(curvature, members, vectors) * (len(members) / count)
        return total

    def _batch_product(self, curvature: str):
        if curvature == "hessian":
            return TrainingHVP(self)
        return lambda indices, vectors, out=None: self.curvature_vp(curvature, indices, vectors, out)

    def _full_product(self, curvature: str):
        return lambda vectors: self.full_hvp(vectors, curvature=curvature)

    def _sample(self, count: int) -> list[int]:
        """A fixed sample of ``count`` training indices (all of them when there are fewer), in order."""
        if count >= self.num_train:
            return list(range(self.num_train))
        return sorted(np.random.default_rng(0).choice(self.num_train, size=count, replace=False).tolist())

    def spectrum(self, curvature: str = "gauss-newton") -> Spectrum:
        """Largest and mean eigenvalue of the curvature (L2 term included), estimated once and kept with the artefacts."""
        if curvature in self._spectra:
            return self._spectra[curvature]
        path = self.artefact_dir / f"spectrum-{curvature}.json" if self.artefact_dir is not None else None
        if path is not None and path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("version") == ARTEFACT_VERSION:
                self._spectra[curvature] = Spectrum.from_dict(stored)
                return self._spectra[curvature]
        self._require_prepared()
        sample = self._sample(SPECTRUM_EXAMPLES)
        spectrum = estimate_spectrum(lambda v: self.full_hvp(v, curvature=curvature, indices=sample),
                                     self.num_params, curvature, len(sample), device=self.classifier.device)
        if path is not None:
            path.write_text(json.dumps({**spectrum.to_dict(), "version": ARTEFACT_VERSION}, indent=1, sort_keys=True))
        self._spectra[curvature] = spectrum
        return spectrum

    @property
    def _factors_path(self) -> Path | None:
        return self.artefact_dir / "ekfac.safetensors" if self.artefact_dir is not None else None

    def factors(self, on_progress: ProgressCallback | None = None) -> KroneckerFactors:
        """EK-FAC's factors of the Gauss-Newton matrix (fastif/curvature/kfac.py), fitted once and kept with the artefacts."""
        if self._factors is not None:
            return self._factors
        path = self._factors_path
        loaded = KroneckerFactors.load(path) if path is not None else None
        if loaded is not None and loaded.names == self.names:
            self._factors = loaded
            return loaded
        self._require_prepared()
        sample = self._sample(FIT_EXAMPLES)
        chunks = [[sample[c] for c in chunk] for chunk in length_batches([self.tokens.lengths[i] for i in sample], 64)]
        if self.factored is not None and self.prefix_store is not None:
            top = self.objective.top

            def forward(batch, hidden, tape):
                return top(hidden, batch.attention_mask, tape)
            modules = self.factored.modules
        else:
            def forward(batch, hidden, tape):
                return self.objective.logits(batch, hidden)
            modules = [m for _, m in self.model.named_modules()]
        factors = fit_factors(forward, modules, self.names, self.objective.params,
                              lambda: (self._batch(chunk) for chunk in chunks), on_progress, len(chunks))
        if path is not None:
            factors.save(path)
        self._factors = factors
        return factors

    def solve(self, vectors: torch.Tensor, solver: Solver = SolverConfig(),
              on_progress: ProgressCallback | None = None) -> Solution:
        """s_test = (C + λI)⁻¹ v for each row of ``vectors``, by the solver ``solver`` names (fastif/curvature)."""
        self._require_prepared()
        vectors = vectors.to(self.classifier.device)
        return solver_for(solver_config(solver), self.curvature).solve(vectors, _stage(on_progress, "s_test"))

    def candidates(self, query: SearchQuery, k: int | None) -> Candidates:
        """The k nearest training examples to ``query`` in the index's space; every example when k is None or 0.

        The distances are L2 between first-token features, whatever space the index searches.
        """
        self._require_prepared()
        if not k or k >= self.num_train:
            return Candidates(indices=np.arange(self.num_train), distances=None)
        indices = knn.search(self.index, query.key, k)
        return Candidates(indices=indices, distances=feature_distances(self.features, indices, query.feature))

    def score(
        self,
        s_test: torch.Tensor,
        indices: Sequence[int],
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """I(z_i, z_t) = -⟨∇L(z_i), s_test⟩ for each training index."""
        return self.score_rows(s_test.unsqueeze(0), [indices], batch_size, on_progress)[0]

    def score_rows(
        self,
        s_tests: torch.Tensor,
        candidates: Sequence[Sequence[int]],
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
    ) -> list[np.ndarray]:
        """The scores of each row of ``s_tests`` [m, P] on its own training indices.

        From per-example factors where the engine has them: each candidate runs forward
        and backward once, however many rows list it. Otherwise by batched JVPs, row by row.
        """
        self._require_prepared()
        if self.factored is None or self.prefix_store is None:
            return [self.scores_by_jvp(s, c, batch_size, on_progress) for s, c in zip(s_tests, candidates)]
        s_tests = s_tests.to(self.classifier.device)
        lists = [np.asarray([int(i) for i in c], dtype=np.int64) for c in candidates]
        scores = [np.zeros(len(c), dtype=np.float64) for c in lists]
        union = np.unique(np.concatenate(lists)) if lists else np.zeros(0, dtype=np.int64)
        chunks = length_batches([len(self.tokens.input_ids[i]) for i in union], batch_size)
        chunk_of, local_of = np.zeros(len(union), dtype=np.int64), np.zeros(len(union), dtype=np.int64)
        for number, chunk in enumerate(chunks):
            chunk_of[chunk], local_of[chunk] = number, np.arange(len(chunk))
        # Per row: its positions ordered by chunk, and where each chunk's run starts.
        placed = []
        for listed in lists:
            at = np.searchsorted(union, listed)
            order = np.argsort(chunk_of[at], kind="stable")
            placed.append((order, np.searchsorted(chunk_of[at][order], np.arange(len(chunks) + 1)), local_of[at]))
        directions = [self.objective.unflatten(s) for s in s_tests]
        l2 = [self.objective.l2_derivative(s) for s in s_tests]
        total, done = sum(len(c) for c in lists), 0
        for number, chunk in enumerate(chunks):
            batch, hidden = self._batch(union[chunk].tolist())
            uses = self.factored.factors(batch, hidden)
            for row, (order, starts, local) in enumerate(placed):
                where = order[starts[number] : starts[number + 1]]
                if len(where):
                    rows = torch.from_numpy(local[where]).to(self.classifier.device)
                    derivatives = self.factored.contract(uses, directions[row], rows)
                    scores[row][where] = -(derivatives.double().cpu().numpy() + l2[row])
                    done += len(where)
            if on_progress and on_progress("scoring", done, total):
                raise CancelledError("cancelled while scoring")
        return scores

    def scores_by_jvp(
        self,
        s_test: torch.Tensor,
        indices: Sequence[int],
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
        tokens: Tokenized | None = None,
        batch_of: Callable[[list[int]], tuple[Batch, torch.Tensor | None]] | None = None,
    ) -> np.ndarray:
        """-⟨∇L(z_i), s_test⟩ by batched JVPs, row by row: the path for any model shape.

        ``tokens`` and ``batch_of`` name another set of examples than the training set
        (fastif/applications scores pools of candidates this way).
        """
        tokens, batch_of = (tokens, batch_of) if batch_of is not None else (self.tokens, self._batch)
        indices = [int(i) for i in indices]
        scores = np.zeros(len(indices), dtype=np.float64)
        done = 0
        s_test = s_test.to(self.classifier.device)
        for chunk in length_batches([len(tokens.input_ids[i]) for i in indices], batch_size):
            batch, hidden = batch_of([indices[c] for c in chunk])
            derivatives = self.objective.directional_derivatives(batch, hidden, s_test)
            scores[chunk] = -derivatives.double().cpu().numpy()  # positions: a repeated index gets each
            done += len(chunk)
            if on_progress and on_progress("scoring", done, len(indices)):
                raise CancelledError("cancelled while scoring")
        return scores

    def _require_prepared(self) -> None:
        if self.index is None:
            raise RuntimeError("call prepare() before querying")

    # -- everything at once -------------------------------------------------------------
    def plan(self, queries: Sequence[Query], group: bool = False, cache: TensorCache | None = None) -> QueryPlan:
        """Encode the inputs and take their test gradients: the vectors s_test is solved for."""
        clock = time.perf_counter()
        encoded = self.encode(queries)
        grads = self._cached_gradients(queries, encoded, cache)
        if group:
            # The mean gradient's output-layer part is the mean of the inputs' gradient keys.
            vectors = grads.mean(dim=0, keepdim=True)
            search = [SearchQuery(key=encoded.search_keys.mean(axis=0), feature=encoded.features.mean(axis=0))]
            keys = [self._group_key(queries, encoded)]
        else:
            vectors, search = grads, [encoded.search(row) for row in range(len(queries))]
            keys = [self._query_key(q, label) for q, label in zip(queries, encoded.labels_used)]
        return QueryPlan(encoded, vectors, search, keys, {"gradients": time.perf_counter() - clock})

    def cached_s_test(
        self, plan: QueryPlan, solver: Solver, cache: TensorCache | None = None,
        on_progress: ProgressCallback | None = None, extra_key: dict | None = None,
    ) -> tuple[torch.Tensor, dict, list[bool]]:
        """s_test of every row of the plan, from ``cache`` where present; (s_tests, solver diagnostics, cached per row).

        The diagnostics are the solver's own (``Solution.diagnostics``) for the rows it
        solved now; when every row came from the cache they say only which solver it was.
        """
        clock = time.perf_counter()
        config = solver_config(solver)
        solver_key = {**config.cache_identity(), **(extra_key or {})}
        found = [cache.get("s_test", {**key, **solver_key}) if cache else None for key in plan.keys]
        missing = [i for i, s in enumerate(found) if s is None]
        diagnostics = {"solver": config.solver, "curvature": config.curvature, "converged": True}
        if config.damping is None:
            diagnostics.update(damping_scope=config.damping_scope, damping_ratio=config.damping_ratio)
        if missing:
            solution = self.solve(plan.vectors[missing], config, on_progress)
            diagnostics.update(solution.diagnostics(), curvature=config.curvature)
            for i, s in zip(missing, solution.vectors):
                found[i] = s
                if cache is not None:
                    cache.put("s_test", {**plan.keys[i], **solver_key}, s)
        plan.seconds["s_test"] = time.perf_counter() - clock
        stacked = torch.stack([s.to(self.classifier.device) for s in found])
        return stacked, diagnostics, [i not in missing for i in range(len(plan.keys))]

    def influences(
        self, plan: QueryPlan, s_tests: torch.Tensor, k: int | None, diagnostics: dict | bool, cached: Sequence[bool],
        on_progress: ProgressCallback | None = None,
    ) -> list[Influence]:
        """kNN candidates and their scores for every row of the plan."""
        clock = time.perf_counter()
        found = [self.candidates(query, k) for query in plan.search]
        knn_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = self.score_rows(s_tests, [f.indices for f in found], on_progress=on_progress)
        # Like gradients and s_test, kNN and scoring run for all rows at once: whole-job seconds.
        seconds = {**plan.seconds, "knn": knn_seconds, "scoring": time.perf_counter() - clock}
        diagnostics = diagnostics if isinstance(diagnostics, dict) else {"converged": bool(diagnostics)}
        return [
            Influence(indices=f.indices, scores=row_scores, distances=f.distances,
                      converged=bool(diagnostics.get("converged", True)), s_test_norm=float(s.norm()),
                      cached=bool(was_cached), seconds=seconds, solver=dict(diagnostics))
            for f, row_scores, s, was_cached in zip(found, scores, s_tests, cached)
        ]

    def analyze(
        self,
        queries: Sequence[Query],
        k: int | None = 1000,
        solver: Solver = SolverConfig(),
        group: bool = False,
        cache: TensorCache | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[EncodedQueries, list[Influence]]:
        """FastIF's query: kNN candidates, s_test, scores; one Influence per query (one for a group)."""
        self.prepare(on_progress)
        plan = self.plan(queries, group, cache)
        s_tests, diagnostics, cached = self.cached_s_test(plan, solver, cache, on_progress)
        return plan.encoded, self.influences(plan, s_tests, k, diagnostics, cached, on_progress)

    @staticmethod
    def _query_key(query: Query, label: int) -> dict:
        return {"text": query.text, "text_pair": query.text_pair, "label": label}

    def _group_key(self, queries: Sequence[Query], encoded: EncodedQueries) -> dict:
        return {"group": [self._query_key(q, l) for q, l in zip(queries, encoded.labels_used)]}

    def _cached_gradients(self, queries: Sequence[Query], encoded: EncodedQueries, cache: TensorCache | None) -> torch.Tensor:
        if cache is None:
            return self.test_gradients(encoded)
        keys = [self._query_key(q, l) for q, l in zip(queries, encoded.labels_used)]
        found = [cache.get("grad", key) for key in keys]
        missing = [i for i, g in enumerate(found) if g is None]
        if missing:
            for i, grad in zip(missing, self.test_gradients(encoded, missing)):
                found[i] = grad
                cache.put("grad", keys[i], grad)
        return torch.stack([g.to(self.classifier.device) for g in found])
