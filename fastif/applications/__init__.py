"""FastIF's applications on top of the engine: explanations, influence graphs, error
correction (with the training set or a pool of new examples) and self-influence.

Each module uses the engine's public methods and its one training objective; none
imports Celery, Redis or HTTP.
"""

from .correction import STRATEGIES, Correction, CorrectionConfig, correct, render_rounds, save_corrected
from .examples import ExampleSet, encode_examples, evaluate, training_set
from .explain import agreement, explain
from .graph import influence_graph, layout, render
from .self_influence import rank_self_influence, self_influence_scores

__all__ = [
    "STRATEGIES", "Correction", "CorrectionConfig", "ExampleSet", "agreement", "correct", "encode_examples", "evaluate",
    "explain", "influence_graph", "layout", "rank_self_influence", "render", "render_rounds", "save_corrected", "self_influence_scores",
    "training_set",
]
