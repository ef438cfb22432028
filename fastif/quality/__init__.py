"""Are the influence scores true? The linear datamodeling score (LDS).

Agreement between solvers only says that a solver solves its system. Whether the
scores predict what *retraining* does is measured by the LDS (Park et al. 2023,
TRAK; also reported by Kronfluence, dattri and Bergson):

1. draw ``count`` random training subsets S_1..S_m, each holding a fixed fraction
   of the N training examples (``random_subsets``);
2. retrain on each subset and record every test input's loss (``retrained_test_losses``);
3. per test input z_t, the Spearman correlation over subsets between the sum of
   the included examples' scores Σ_{i∈S} I(z_i, z_t) and the retrained test loss
   (``lds``); the LDS is its mean over test inputs.

Scores follow the engine's convention, I(z, z_t) = -∇L(z_t)ᵀ(C + λI)⁻¹∇L(z):
negative = helpful. Including helpful examples lowers the test loss, so good
scores give a *positive* correlation between Σ_{i∈S} I_i and the retrained loss.

The measurement in stages, one module each:

- ``subsets``: the random training subsets and each subset's sum of scores;
- ``retraining``: retraining on each subset and the test inputs' losses after it;
- ``metric``: Spearman's correlation per test input, and the LDS over them;
- ``engine_scores``: the influence scores under judgement, from ``engine.analyze``.

No Celery, Redis or HTTP in here (engine side).
"""

from .engine_scores import influence_scores, score_matrix
from .metric import LDSResult, columnwise_spearman, lds
from .retraining import (EvalSet, RetrainConfig, eval_losses, eval_set, initial_parameters, retrain,
                         retrained_test_losses)
from .subsets import random_subsets, subset_sums

__all__ = ["EvalSet", "LDSResult", "RetrainConfig", "columnwise_spearman", "eval_losses", "eval_set",
           "influence_scores", "initial_parameters", "lds", "random_subsets", "retrain", "retrained_test_losses",
           "score_matrix", "subset_sums"]
