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
from .kfac_fit import EIGENVALUE_PARTS, FactorFit, combined_factors
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
        self._factor_fit: FactorFit | None = None
        # EK-FAC's fit under way, until ``combine_factors``: its bases and the parts of pass 2 fitted or loaded here.
        self._bases: KroneckerFactors | None = None
        self._parts: dict[int, dict[int, torch.Tensor]] = {}
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
        """EK-FAC's factors of the Gauss-Newton matrix (fitted by fastif/curvature/kfac_fit.py) once and kept with the
        artefacts; the fit's steps another process saved are loaded, not fitted again."""
        if self._factors is None:
            self._factors = self.store.load_factors(self.objective.names)
            if self._factors is None:
                fit, before = self._fit(), 0
                for part in range(EIGENVALUE_PARTS):
                    self.fit_eigenvalue_part(part, _parts_as_one(on_progress, before, fit.num_batches))
                    before += len(fit.part_batches(part))
                self._factors = self.combine_factors()
        return self._factors

    def factor_bases(self, on_progress: ProgressCallback | None = None) -> KroneckerFactors:
        """Pass 1 of EK-FAC's fit (the eigenbases and the diagonal blocks), fitted unless stored, and stored."""
        if self._bases is None:
            self._bases = self.store.load_factor_bases(self.objective.names)
            if self._bases is None:
                self._bases = self._fit().bases(on_progress)
                self.store.save_factor_bases(self._bases)
        return self._bases

    def fit_eigenvalue_part(self, part: int, on_progress: ProgressCallback | None = None) -> None:
        """Part ``part`` of pass 2 (fastif/curvature/kfac_fit.py ``EIGENVALUE_PARTS``), fitted unless stored, and stored:
        processes that share the artefacts may each fit some parts (the sharded build's workers)."""
        if part in self._parts or self._factors is not None:
            return
        self._factors = self.store.load_factors(self.objective.names)  # combined already: a late copy has nothing to do
        if self._factors is None:
            sums = self.store.load_eigenvalue_part(part, self.objective.names)
            if sums is None:
                sums = self._fit().eigenvalue_part(self.factor_bases(on_progress), part, on_progress)
                self.store.save_eigenvalue_part(part, self.objective.names, sums)
            self._parts[part] = sums

    def combine_factors(self) -> KroneckerFactors | None:
        """The factors once every part is fitted, by this process or another: combined in part order, saved, and
        the steps' files removed; None while a part is missing."""
        names = self.objective.names
        if self._factors is None:
            self._factors = self.store.load_factors(names)
        if self._factors is None:
            bases = self._bases or self.store.load_factor_bases(names)
            parts = [self._parts[part] if part in self._parts else self.store.load_eigenvalue_part(part, names)
                     for part in range(EIGENVALUE_PARTS)]
            if bases is None or any(sums is None for sums in parts):
                return self.store.load_factors(names)  # none yet, or another process combined them and removed the steps
            self._factors = combined_factors(bases, parts)
            self.store.save_factors(self._factors)
            self.store.remove_factor_steps()
            self._bases, self._parts = None, {}
        return self._factors

    def _require_fit(self) -> None:
        if not self.can_fit:
            raise RuntimeError("call prepare() before querying")

    def _fit(self) -> FactorFit:
        """The fit's batches: a fixed sample of the training set, by length, in batches of 64 (whoever fits which step)."""
        self._require_fit()
        if self._factor_fit is None:
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
            self._factor_fit = FactorFit(forward, modules, objective.names, objective.params,
                                         lambda number: self.batches(chunks[number]), len(chunks))
        return self._factor_fit


def _parts_as_one(on_progress: ProgressCallback | None, before: int, total: int) -> ProgressCallback | None:
    """A part's progress through pass 2 as the whole pass's, ``before`` of its ``total`` batches done by earlier parts."""
    if on_progress is None:
        return None

    def report(stage: str, done: int, of: int) -> bool:
        return on_progress(stage, before + done, total) if stage == "curvature eigenvalues" else on_progress(stage, done, of)

    return report
