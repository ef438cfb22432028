"""The curvature of one model's training objective over its training set, as the solvers use it.

C·v on sampled batches (LiSSA) and over the whole set (CG), the spectrum and EK-FAC's
factors (fitted on a fixed sample the first time they are asked for, then kept with
the artefacts), and the ``CurvatureSource`` that hands these to ``solver_for``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..artefacts import ArtefactStore
from ..batches import TrainingBatches
from ..encoding import length_batches
from ..factored import FactoredScores
from ..objective import InfluenceObjective
from ..progress import ProgressCallback
from .iterative import HVP, FusedStep
from .kfac import KroneckerFactors
from .kfac_fit import fit_factors
from .solvers import CurvatureSource
from .spectrum import Spectrum, estimate_spectrum

SPECTRUM_EXAMPLES = 512  # the curvature's spectrum is estimated on this many training examples (a fixed sample)
FIT_EXAMPLES = 10_000  # EK-FAC's factors are fitted on at most this many (a fixed sample beyond that)


class TrainingCurvature:
    """C·v for C the Hessian or the Gauss-Newton matrix of the mean training loss (L2 term included)."""

    def __init__(self, objective: InfluenceObjective, batches: TrainingBatches, store: ArtefactStore,
                 factored: FactoredScores | None, can_fit: bool = True):
        """``can_fit`` False: the spectrum and factors are only loaded from ``store`` (missing: RuntimeError)."""
        self.objective = objective
        self.can_fit = can_fit
        self.batches = batches
        self.store = store
        self.factored = factored
        self._spectra: dict[str, Spectrum] = {}
        self._factors: KroneckerFactors | None = None
        self.source = CurvatureSource(
            num_train=len(batches), batch_product=self.batch_product, full_product=self.full_product,
            spectrum=self.spectrum, factors=self.factors, fused_step=self.fused_step,
            decay=[objective.weight_decay * float(d) for d in objective.decay])

    def vp(self, curvature: str, indices: Sequence[int], vectors: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
        """C·v, C the ``curvature`` ("hessian" or "gauss-newton") of the mean loss over training examples ``indices``."""
        batch, hidden = self.batches(indices)
        return self.objective.curvature_vp(curvature, batch, hidden, vectors, out)

    def full_vp(self, vectors: torch.Tensor, batch_size: int = 64, curvature: str = "hessian",
                indices: Sequence[int] | None = None) -> torch.Tensor:
        """C·v with C the curvature of the mean loss over the whole training set (or over ``indices``)."""
        total = torch.zeros_like(vectors)
        lengths = self.batches.lengths(indices)
        for chunk in length_batches(lengths, batch_size):
            members = chunk if indices is None else [indices[c] for c in chunk]
            total += self.vp(curvature, members, vectors) * (len(members) / len(lengths))
        return total

    def batch_product(self, curvature: str) -> HVP:
        return lambda indices, vectors, out=None: self.vp(curvature, indices, vectors, out)

    def full_product(self, curvature: str):
        return lambda vectors: self.full_vp(vectors, curvature=curvature)

    def fused_step(self, curvature: str) -> FusedStep | None:
        """LiSSA's step on the Hessian in one compiled program (fastif/compiled.py), where the objective has one."""
        compiled = self.objective.compiled
        if curvature != "hessian" or compiled is None or not self.batches.with_prefix:
            return None

        def step(indices: Sequence[int], h: torch.Tensor, vectors: torch.Tensor, damp: float, scale: float):
            batch, hidden = self.batches(indices)
            return compiled.step(batch, hidden, h, vectors, self.objective.decay_hessian, damp, scale)

        return step

    def spectrum(self, curvature: str = "gauss-newton") -> Spectrum:
        """Largest and mean eigenvalue of the curvature (L2 term included), estimated once and kept with the artefacts."""
        if curvature not in self._spectra:
            spectrum = self.store.load_spectrum(curvature)
            if spectrum is None:
                self._require_fit()
                sample = self.batches.sample(SPECTRUM_EXAMPLES)
                spectrum = estimate_spectrum(lambda v: self.full_vp(v, curvature=curvature, indices=sample),
                                             self.objective.num_params, curvature, len(sample),
                                             device=self.objective.classifier.device)
                self.store.save_spectrum(spectrum)
            self._spectra[curvature] = spectrum
        return self._spectra[curvature]

    def factors(self, on_progress: ProgressCallback | None = None) -> KroneckerFactors:
        """EK-FAC's factors of the Gauss-Newton matrix (fitted by fastif/curvature/kfac_fit.py) once and kept with the artefacts."""
        if self._factors is None:
            self._factors = self.store.load_factors(self.objective.names) or self._fit_factors(on_progress)
        return self._factors

    def _require_fit(self) -> None:
        if not self.can_fit:
            raise RuntimeError("call prepare() before querying")

    def _fit_factors(self, on_progress: ProgressCallback | None) -> KroneckerFactors:
        self._require_fit()
        sample = self.batches.sample(FIT_EXAMPLES)
        chunks = [[sample[c] for c in chunk] for chunk in length_batches(self.batches.lengths(sample), 64)]
        objective = self.objective
        if self.factored is not None and self.batches.with_prefix:
            def forward(batch, hidden, tape):
                return objective.top(hidden, batch.attention_mask, tape)
            modules = self.factored.modules
        else:
            def forward(batch, hidden, tape):
                return objective.logits(batch, hidden)
            modules = [m for _, m in objective.model.named_modules()]
        factors = fit_factors(forward, modules, objective.names, objective.params,
                              lambda: (self.batches(chunk) for chunk in chunks), on_progress, len(chunks))
        self.store.save_factors(factors)
        return factors
