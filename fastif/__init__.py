"""FastIF: influence functions for text classifiers, made fast.

kNN candidates (faiss) + an inverse of the curvature (EK-FAC factors fitted once per
model by default; LiSSA, CG, K-FAC or none on the Gauss-Newton matrix or the Hessian,
damped relative to the measured spectrum: fastif/curvature/) + scoring from
per-example gradient factors (batched JVPs where those do not apply) on the
fine-tuned top of a Hugging Face classifier. No Celery, Redis or HTTP in here.
"""

from .config import CGConfig, DataSpec, IndexConfig, InfluenceSpec, LissaConfig, SolverConfig
from .data import Example, load_examples
from .encoded import EncodedQueries
from .engine import InfluenceEngine
from .query import Influence, Query
from .errors import CancelledError, DataError, FastIFError, LabelError, LissaDivergedError, ModelLoadError, ParamSelectionError
from .modeling import Classifier, load_classifier

__all__ = [
    "CGConfig", "CancelledError", "Classifier", "DataError", "DataSpec", "EncodedQueries", "Example", "FastIFError", "IndexConfig",
    "Influence", "InfluenceEngine", "InfluenceSpec", "LabelError", "LissaConfig", "LissaDivergedError",
    "ModelLoadError", "ParamSelectionError", "Query", "SolverConfig", "load_classifier", "load_examples",
]
