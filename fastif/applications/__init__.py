"""FastIF's applications on top of the engine: influence graphs, error correction (with the
training set or a pool of new examples) and self-influence. Explanations are influence
results plus a label agreement, built where the result items are (workers/results.py).

Each module uses the engine's public methods and its one training objective; none
imports Celery, Redis or HTTP.
"""

from .correction import STRATEGIES, Correction, CorrectionConfig, correct, render_rounds, save_corrected
from .examples import ExampleSet, encode_examples, evaluate, training_set
from .graph import influence_graph, layout, render
from .self_influence import inputs_self_influence, rank_self_influence, self_influence_scores

__all__ = [
    "STRATEGIES", "Correction", "CorrectionConfig", "ExampleSet", "correct", "encode_examples", "evaluate",
    "influence_graph", "inputs_self_influence", "layout", "rank_self_influence", "render", "render_rounds", "save_corrected", "self_influence_scores",
    "training_set",
]
