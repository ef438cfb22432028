"""Error correction with influence (FastIF §5): the iterative protocol, its point selection, steps and report."""

from .config import OPTIMIZERS, STRATEGIES, CorrectionConfig
from .plot import render_rounds
from .protocol import Correction, correct, save_corrected

__all__ = ["OPTIMIZERS", "STRATEGIES", "Correction", "CorrectionConfig", "correct", "render_rounds", "save_corrected"]
