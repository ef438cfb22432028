"""Mutation testing of the modules where a silent wrong number hurts most, and its report.

``python bench/mutation.py run`` runs mutmut (configured in pyproject.toml, ``[tool.mutmut]``)
over the functions in ``TARGETS``, each with the fast tests that reach it; ``python
bench/mutation.py report`` writes ``bench/results/mutation.md`` from mutmut's results:
killed, survived, timeouts and untested per module, and every survivor with its one-line
diff and what became of it (``VERDICTS``: the test that now kills it, or why it is
equivalent). ``make mutate`` does both from a fresh copy (``mutants/``, ignored by git).

After writing tests for a first pass's survivors, ``python bench/mutation.py rerun`` runs those
survivors again; once a target function itself has changed, its mutants are numbered afresh, so
``python bench/mutation.py again`` runs every mutant afresh instead, keeping the first pass for
the report's history. ``python bench/mutation.py confirm`` records the diff each survivor's
verdict was read against (bench/mutation_verdicts.json); a later report flags a verdict whose
mutant now reads differently as stale.

The targets are whole modules, except the engine (fastif/engine.py), of which only the
query's steps count (plan, candidates, s_test cache, influences); building, artefacts and
encoding are covered by the engine's ordinary tests. Each mutant's tests run fastest first in
a process forked from a server whose heap is frozen (bench/mutmut_plugin.py). Lines that only
raise or spell out a message for people are not mutated (``do_not_mutate_patterns``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "mutation.md"
# The diff each verdict was written for: mutmut numbers a function's mutants afresh when the function changes, so
# a verdict found under a name whose diff is no longer this one belongs to another change and is flagged as stale.
VERDICT_DIFFS = ROOT / "bench" / "mutation_verdicts.json"
TIMINGS = ROOT / "mutants" / "run-seconds.json"
FIRST_PASS = ROOT / "mutants" / "first-pass.json"
# the first pass's survivors as they read then: a function changed since has its mutants numbered afresh, so an old
# name whose diff reads differently now no longer says which change it was
FIRST_PASS_SURVIVORS = ROOT / "mutants" / "first-pass-survivors.json"

# module -> mutmut name globs (mutmut names a mutant ``module.x_function__mutmut_N``, methods ``xǁClassǁmethod``)
TARGETS: dict[str, list[str]] = {
    "fastif/curvature/iterative.py": ["fastif.curvature.iterative.*"],
    "fastif/curvature/damping.py": ["fastif.curvature.damping.*"],
    "fastif/curvature/solvers.py": ["fastif.curvature.solvers.*"],
    "fastif/curvature/spectrum.py": ["fastif.curvature.spectrum.*"],
    "fastif/curvature/kfac.py": ["fastif.curvature.kfac.xǁKronecker*", "fastif.curvature.kfac.x_low_rank*",
                                 "fastif.curvature.kfac.x_solved_rows*", "fastif.curvature.kfac.x_inverse_factors*",
                                 "fastif.curvature.kfac.x__checked*"],
    "fastif/low_rank_scoring.py": ["fastif.low_rank_scoring.*"],
    "fastif/factored.py": ["fastif.factored.*"],
    "fastif/tape.py": ["fastif.tape.*"],
    "fastif/scoring.py": ["fastif.scoring.*"],
    "fastif/query.py": ["fastif.query.*"],
    "fastif/engine.py (the query's steps)": [
        "fastif.engine.xǁInfluenceEngineǁscore*", "fastif.engine.xǁInfluenceEngineǁcandidates*",
        "fastif.engine.xǁInfluenceEngineǁcached_s_test*", "fastif.engine.xǁInfluenceEngineǁinfluences*",
        "fastif.engine.xǁInfluenceEngineǁplan*",
    ],
    "fastif/knn.py": ["fastif.knn.*"],
    "fastif/params.py": ["fastif.params.*"],
    "workers/parallel.py": [
        "workers.parallel.x_start_parallel*", "workers.parallel.x_shard_seed_config*", "workers.parallel.x_averaged_key*",
        "workers.parallel.x__shard_guard*", "workers.parallel.x__stest_work*", "workers.parallel.x__average*",
        "workers.parallel.x__slice*", "workers.parallel.x__score_work*", "workers.parallel.x__merge*",
        "workers.parallel.x_advance*", "workers.parallel.x__in_phase*", "workers.parallel.x__count_done*",
        "workers.parallel.xǁScoringPlanǁ*",
    ],
    "records/keys.py": ["records.keys.*"],
    "fastif/applications/correction/selection.py": ["fastif.applications.correction.selection.*"],
}

CAUGHT = ("killed", "caught by type check", "segfault")  # a crash of the test process is a detection too


def status_of(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code  # mutmut's own names for its exit codes

    return status_by_exit_code[code]


# Survivors of the last run and what became of each: "killed by <test>" (a test written since) or
# "equivalent: <why>". A survivor without a verdict is listed as open.
SAME_SORT = "equivalent: a positive factor on the sign changes neither which scores pass nor their order"
DEFAULT_KIND = "equivalent: every kind but \"kfac\" means EK-FAC's eigenvalues, so another default string is the same"
TUNING = ("equivalent: a tuning default (Lanczos steps, Hutchinson probes); one more gives an estimate as valid, "
          "and a test could only restate the constant")
ON_CPU = "equivalent on a CPU machine: a device of None is the CPU (a GPU run would see it)"
PROBE_SEED = ("equivalent: any offset from Lanczos's seed keeps the probes' stream apart from its start vector; "
              "the estimate is as valid")
ONE_PROBE = "equivalent: numpy's std with ddof=1 of a single value is NaN already"
START = ("equivalent: the random start vector drawn in float32 rather than float64 is another valid start "
         "(it is cast to the working dtype either way)")
TRIDIAGONAL = ("equivalent: eigvalsh reads only the lower triangle, and negating the off-diagonal of a symmetric "
               "tridiagonal matrix is a similarity (by diag(±1)) that keeps its eigenvalues")
JSON_FLOATS = "equivalent: the scores come back from JSON as Python floats, which numpy makes float64 anyway"
FAISS_CAST = "equivalent: faiss's Python wrapper casts what it is given to contiguous float32 itself"
SETTLED_GUARD = ("equivalent: the tenth is at most a tenth of the run, so from four norms on the run is always "
                 "longer than two (or three) tenths: only the len < 4 guard ever decides")
BUFFER = ("equivalent in its numbers: LiSSA's reused output buffer (out=) is a speed measure; without it the "
          "product allocates a fresh tensor with the same values")
ALARM = ("equivalent: the divergence alarm sits 1000× above any converging run; a diverging one grows "
         "geometrically and passes either bar (or overflows to inf) a step or so later")
STREAMS = ("equivalent: another one-to-one map of (seed, repeat) to sampling streams within the API's bounds "
           "(repeats ≤ 64): every shard and repeat still draws its own stream")
FLOAT_CHUNKS = ("equivalent: chunk numbers held as floats sort, compare and search exactly as the same integers "
                "(they are small)")
WITHIN_CHUNK = ("equivalent: an unstable sort only reorders a row's positions within one chunk, and each position "
                "is still written with its own candidate's score")
ONE_DTYPE = ("equivalent: every influence parameter of one model has the same dtype and device, so the accumulator "
             "made like the second block's is made like the first's")
BETAS = ("equivalent: Lanczos keeps one β fewer than α however it stops (at the last step, or at a breakdown, "
         "which full reorthogonalisation reaches by the last dimension), so slicing to len + 1 takes the same βs")
TEMP_NAME = "equivalent: the name of the temporary file that is renamed onto the target at once"
CASE_BLIND = "equivalent: numpy reads the sort kind case-blind"
NO_REPLACE = "equivalent: numpy's Generator.choice reads replace=None as False"
INT64 = "equivalent: numpy makes int64 of Python ints (and float64 of Python floats) without being told"
ZEROS = "equivalent: numpy's zeros are float64 by default"
PROMOTED = ("equivalent: the coordinates are float64, so numpy promotes float32 activations to float64 for the product "
            "anyway (a product of two float32 numbers is exact in float64)")
BATCH_DEFAULT = "equivalent: the default batch size only regroups examples whose scores are computed one by one"
STEST_PLAN = ("equivalent in its numbers: without the cache the s_test shard computes the inputs' gradients itself "
              "instead of reading those stored by the job's first plan")
# The tests written for the survivors of a first pass, by the function they guard (a mutant name up to
# "__mutmut_"); a rerun shows which of those survivors they kill.
KILLED_BY: dict[str, str] = {
    "fastif.applications.correction.selection.x_round_influence":
        "tests/test_gaps_engine.py::test_round_influence_scores_each_side_of_the_anchors (cache traffic, progress, "
        "diagnostics, and a k at which each side differs from the strongest of either sign)",
    "fastif.applications.correction.selection.x_choose": "tests/test_gaps_engine.py::test_ties_keep_the_candidates_order",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁsave":
        "tests/test_gaps_solvers.py::test_kronecker_factors_survive_saving_and_loading (saves twice into new folders)",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁload":
        "tests/test_gaps_solvers.py::test_kronecker_factors_survive_saving_and_loading (runs in its own folder, "
        "so a file another mutant left under a wrong name cannot be read back)",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁinverse_apply":
        "tests/test_gaps_solvers.py::test_kronecker_inverse_of_float32_vectors_runs_in_the_factors_precision",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁmean_eigenvalue":
        "tests/test_gaps_solvers.py::test_mean_eigenvalue_of_a_single_covered_number",
    "fastif.curvature.spectrum.x_lanczos_extremes":
        "tests/test_gaps_solvers.py::test_lanczos_works_in_its_own_precision_whatever_the_product_returns / "
        "test_lanczos_asked_for_more_steps_than_dimensions_in_float32",
    "fastif.curvature.spectrum.x_hutchinson_trace":
        "tests/test_gaps_solvers.py::test_lanczos_works_in_its_own_precision_whatever_the_product_returns (two probes)",
    "fastif.curvature.iterative.x__settled":
        "tests/test_gaps_solvers.py::test_settled_compares_the_last_tenth_with_the_tenth_before (norms far from 1)",
    "fastif.curvature.iterative.x_conjugate_gradient":
        "tests/test_gaps_solvers.py::test_cg_stops_at_a_residual_relative_to_the_vector / "
        "test_cg_stops_at_zero_curvature_instead_of_dividing_by_it",
    "fastif.curvature.iterative.x_lissa":
        "tests/test_gaps_solvers.py::test_lissa_is_linear_in_the_vector_whatever_its_norm / "
        "test_lissa_uses_a_fused_step_when_offered_and_the_plain_product_when_declined (per-example batches)",
    "fastif.curvature.solvers.xǁConjugateGradientSolverǁsolve":
        "tests/test_gaps_solvers.py::test_cg_stops_at_a_residual_relative_to_the_vector (progress through the solver)",
    "fastif.engine.xǁInfluenceEngineǁscores_by_jvp":
        "tests/test_gaps_engine.py::test_a_pool_outside_the_training_set_is_scored_on_its_own_examples / "
        "test_scoring_reports_progress_and_stops_when_asked",
    "fastif.engine.xǁInfluenceEngineǁscore_rows":
        "tests/test_gaps_engine.py::test_the_factored_path_really_scores_when_it_is_on",
    "fastif.engine.xǁInfluenceEngineǁcached_s_test":
        "tests/test_gaps_engine.py::test_a_partly_cached_plan_solves_only_the_missing_rows (diagnostics of a full hit)",
    "fastif.engine.xǁInfluenceEngineǁinfluences":
        "tests/test_gaps_engine.py::test_candidates_and_influences_of_a_plan (progress, seconds, converged)",
    "fastif.knn.x_build_index": "tests/test_gaps_knn_params.py::test_default_ivf_cells_follow_both_bounds / "
        "tests/test_engine_index_auto.py::test_auto_trains_on_the_sample_and_an_explicit_ivf_on_every_vector",
    "fastif.knn.x_search": "tests/test_gaps_knn_params.py::test_ties_in_strength_keep_the_order_the_two_searches_returned",
    "fastif.params.x__around_encoder": "tests/test_gaps_knn_params.py::test_a_model_whose_blocks_are_outside_its_base_model",
    "fastif.params.x__under":
        "tests/test_gaps_knn_params.py::test_a_single_block_is_a_layer_stack_and_names_ending_in_x_are_prefixes",
    "fastif.params.x_find_layer_stack":
        "tests/test_gaps_knn_params.py::test_a_single_block_is_a_layer_stack_and_names_ending_in_x_are_prefixes",
    "fastif.params.x_select_influence_params": "tests/test_gaps_knn_params.py::test_a_bad_prefix_error_shows_the_first_four_names",
    "records.keys.x_cache_pattern": "tests/test_gaps_cache_keys.py::test_cache_pattern_matches_exactly_one_models_keys_on_redis",
    "workers.parallel.x__score_work":
        "tests/test_gaps_parallel.py::test_a_score_shard_delivered_again_before_the_merge_finished_does_not_merge_twice / "
        "test_two_parallel_jobs_one_after_the_other_both_finish / test_redelivered_shards_count_once_and_score_once "
        "(progress) / test_parallel_job_equals_the_average_of_single_seed_estimates (seconds)",
    "workers.parallel.x__merge":
        "tests/test_gaps_parallel.py::test_the_job_is_converged_when_every_shard_converged / "
        "test_parallel_job_equals_the_average_of_single_seed_estimates (diagnostics' keys, cached, the result cache)",
    "workers.parallel.x__stest_work":
        "tests/test_gaps_parallel.py::test_one_unsettled_shard_makes_the_job_unconverged_whichever_finishes_last / "
        "test_the_job_is_converged_when_every_shard_converged / test_two_parallel_jobs_one_after_the_other_both_finish",
    "workers.parallel.x_start_parallel": "tests/test_gaps_parallel.py::test_two_parallel_jobs_one_after_the_other_both_finish",
    "fastif.curvature.solvers.x_solver_for":
        "tests/test_gaps_solvers.py::test_lissa_from_solver_for_takes_the_fused_step_of_its_own_curvature",
    "fastif.curvature.solvers.xǁLissaSolverǁsolve":
        "tests/test_gaps_solvers.py::test_lissa_from_solver_for_takes_the_fused_step_of_its_own_curvature",
    "fastif.scoring.xǁScorerǁscore_rows":
        "tests/test_gaps_engine.py::test_a_scorer_uses_the_factors_only_with_the_prefix_they_start_from (no rows: no batch)",
    "fastif.scoring.xǁScorerǁ__init__":
        "tests/test_gaps_engine.py::test_a_scorer_uses_the_factors_only_with_the_prefix_they_start_from",
    "fastif.engine.xǁInfluenceEngineǁplan": "tests/test_gaps_engine.py::test_candidates_and_influences_of_a_plan (seconds)",
    "fastif.knn.x__choose_nprobe": "tests/test_engine_index_auto.py::test_auto_keeps_one_probe_when_one_meets_the_target",
    "fastif.knn.x_gradient_keys":
        "tests/test_gaps_knn_params.py::test_gradient_keys_of_float32_inputs_are_computed_in_float64_and_rounded_once",
    "fastif.knn.xǁRecallSampleǁof":
        "tests/test_engine_index_auto.py::test_recall_queries_are_distinct_rows_and_small_keys_still_count",
    "fastif.knn.xǁRecallSampleǁrecall":
        "tests/test_engine_index_auto.py::test_recall_of_no_query_or_of_a_single_neighbour_is_one",
    "records.keys.x_idem": "tests/test_gaps_cache_keys.py::test_every_key_is_spelled_out (two owners, one key)",
}


# First-pass survivors whose function was changed rather than tested: what became of them.
CHANGED: dict[str, str] = {
    "fastif.curvature.solvers.x_solver_for__mutmut_35":
        "λ was computed for every solver and then unused by the per-block one; solver_for now returns the per-block "
        "solver first, so there is no dead value left to mutate",
    **{f"fastif.curvature.solvers.x_solver_for__mutmut_{old}":
       f"the same change is now x_solver_for__mutmut_{new}, killed by "
       "tests/test_gaps_solvers.py::test_lissa_from_solver_for_takes_the_fused_step_of_its_own_curvature"
       for old, new in ((47, 54), (52, 59), (64, 71))},
    "fastif.engine.xǁInfluenceEngineǁcached_s_test__mutmut_47":
        "the same change is now cached_s_test__mutmut_44, listed below (equivalent on a CPU machine)",
    "fastif.engine.xǁInfluenceEngineǁcached_s_test__mutmut_29":
        "the curvature was written into the diagnostics twice; the redundant second write is gone",
}


def killed_by(name: str) -> str:
    return KILLED_BY.get(name.rsplit("__mutmut_", 1)[0], "a test written after the first pass")
VERDICTS: dict[str, str] = {
    "fastif.applications.correction.selection.x_choose__mutmut_32": SAME_SORT,
    "fastif.applications.correction.selection.x_choose__mutmut_36": SAME_SORT,
    "fastif.applications.correction.selection.x_choose__mutmut_39": SAME_SORT + " (dividing by ±1 is multiplying)",
    "fastif.applications.correction.selection.x_choose__mutmut_50": "equivalent: numpy reads the sort kind case-blind",
    "fastif.applications.correction.selection.x_choose__mutmut_7":
        "equivalent: numpy's Generator.choice reads replace=None as False",
    "fastif.applications.correction.selection.x_round_influence__mutmut_64":
        "equivalent: the scores are Python floats, so numpy makes float64 without being told",
    "fastif.applications.correction.selection.x_round_influence__mutmut_66":
        "equivalent: the scores are Python floats, so numpy makes float64 without being told",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁblock_means__mutmut_1": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁblock_means__mutmut_2": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁblock_means__mutmut_4": DEFAULT_KIND + " (mean_eigenvalue(None))",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁinverse_apply__mutmut_1": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁinverse_apply__mutmut_2": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁsave__mutmut_28": TEMP_NAME,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁsave__mutmut_29": TEMP_NAME,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁload__mutmut_27":
        "equivalent: save() always writes \"joined\" into the metadata, so the default is never read",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁload__mutmut_29":
        "equivalent: save() always writes \"joined\" into the metadata, so the default is never read",
    "fastif.curvature.solvers.xǁIdentitySolverǁsolve__mutmut_11": "equivalent: iterations defaults to 0",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁinverse_apply__mutmut_56":
        "equivalent: torch.cat promotes the bias column to the weight block's dtype by itself",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁinverse_apply__mutmut_86":
        "equivalent: [m, n] / [n] broadcasts exactly as [m, n] / [1, n]",
    "fastif.curvature.kfac.xǁKroneckerFactorsǁmean_eigenvalue__mutmut_1": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁmean_eigenvalue__mutmut_2": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁtrace__mutmut_1": DEFAULT_KIND,
    "fastif.curvature.kfac.xǁKroneckerFactorsǁtrace__mutmut_2": DEFAULT_KIND,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_1": TUNING,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_2": TUNING,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_11": ON_CPU,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_16": ON_CPU,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_22": ON_CPU,
    "fastif.curvature.spectrum.x_estimate_spectrum__mutmut_27": ON_CPU,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_24": ON_CPU,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_26": ON_CPU,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_34": "equivalent: randint(2, ...) is randint(0, 2, ...)",
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_4":
        "equivalent: the batch of probes only splits one generator's stream differently; the probes are the same",
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_7": PROBE_SEED,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_8": PROBE_SEED,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_51": ONE_PROBE,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_57": ONE_PROBE,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_61": "equivalent: float(\"NAN\") is NaN",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_1":
        "equivalent: the only caller, estimate_spectrum, always passes the seed",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_13": START,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_16": START,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_45":
        "equivalent: the second pass of the reorthogonalisation subtracts twice what the first one added, which "
        "is the single projection (w - Σ(w·b)b), to rounding",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_52":
        "equivalent to rounding: after the first pass w is orthogonal to the basis, so the second pass adds "
        "(instead of subtracting) projections of the order of the rounding error",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_62":
        "equivalent: the loop ends at step steps-1 anyway; the mutant only appends one unused basis vector",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_64": "equivalent: < or <= at a breakdown threshold",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_65":
        "equivalent to rounding: the breakdown threshold only decides whether Lanczos goes on once the Krylov "
        "space is exhausted, where any further Ritz values are copies of the same ones",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_71":
        "equivalent to rounding: the breakdown threshold (see _65)",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_78": TRIDIAGONAL,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_79": TRIDIAGONAL,
    "fastif.engine.xǁInfluenceEngineǁscore__mutmut_1":
        "equivalent: the default batch size only regroups examples whose scores are computed one by one",
    "workers.parallel.x__merge__mutmut_57": JSON_FLOATS,
    "workers.parallel.x__slice__mutmut_2":
        "equivalent: the float bounds are truncated by int() exactly as astype(int) truncates them",
    "fastif.knn.x_build_index__mutmut_3": FAISS_CAST,
    "fastif.knn.x_build_index__mutmut_5": FAISS_CAST,
    "fastif.knn.x__search__mutmut_8": FAISS_CAST + " (search() already made the key float32)",
    "fastif.knn.x__search__mutmut_10": FAISS_CAST + " (search() already made the key float32)",
    "fastif.knn.x__search__mutmut_16":
        "equivalent here: an index's own efSearch is faiss's 16 unless a caller raised it, and nothing does",
    "fastif.knn.x__search__mutmut_20":
        "equivalent: a tuning constant; searching HNSW 3k deep instead of 2k finds at least the same neighbours",
    "fastif.knn.x_search__mutmut_10": FAISS_CAST + " (_search makes the key float32 again)",
    "fastif.knn.x_search__mutmut_12": FAISS_CAST + " (_search makes the key float32 again)",
    "fastif.knn.x_search__mutmut_15": "equivalent: numpy reads any negative size in reshape as the unknown one",
    "fastif.curvature.solvers.xǁLissaSolverǁsolve__mutmut_4":
        "equivalent: the last attempt raises before the loop could go round once more",
    "fastif.curvature.iterative.x__settled__mutmut_10": SETTLED_GUARD,
    "fastif.curvature.iterative.x__settled__mutmut_11": SETTLED_GUARD,
    "fastif.curvature.iterative.x__settled__mutmut_12": SETTLED_GUARD,
    "fastif.curvature.iterative.x__settled__mutmut_29": "equivalent: < or <= at the 5% threshold",
    "fastif.curvature.iterative.x_lissa__mutmut_14": BUFFER,
    "fastif.curvature.iterative.x_lissa__mutmut_8": ALARM,
    "fastif.curvature.iterative.x_lissa__mutmut_9":
        ALARM + " (the norm over all rows instead of the largest row's only raises the bar)",
    "fastif.curvature.iterative.x_lissa_generator__mutmut_2": STREAMS,
    "fastif.curvature.iterative.x_lissa_generator__mutmut_4": STREAMS,
    "fastif.curvature.iterative.x_conjugate_gradient__mutmut_68": "equivalent: < or <= at the tolerance",
    "fastif.engine.xǁInfluenceEngineǁscore_rows__mutmut_1":
        "equivalent: the default batch size only regroups the candidates of one forward and backward",
    "fastif.factored.xǁFactoredScoresǁcontract__mutmut_4": ON_CPU,
    "fastif.factored.xǁFactoredScoresǁcontract__mutmut_7": ON_CPU,
    "fastif.factored.xǁFactoredScoresǁcontract__mutmut_8": ONE_DTYPE,
    "fastif.factored.xǁFactoredScoresǁcontract__mutmut_9": ONE_DTYPE,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_85": BETAS,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_92": BETAS,
    "workers.parallel.x__stest_work__mutmut_135": STEST_PLAN,
    "records.keys.x_canonical_json__mutmut_4": "equivalent: json reads ensure_ascii=None as False",
    "records.keys.x_canonical_json__mutmut_5": "equivalent: json reads allow_nan=None as False",
    "records.keys.x_sha256_hex__mutmut_5": "equivalent: \"UTF-8\" and \"utf-8\" name the same codec",
    "fastif.params.x__around_encoder__mutmut_22": "equivalent: None and False are both false",
    "fastif.params.x_find_layer_stack__mutmut_3":
        "equivalent: an empty ModuleList has no block type, so it never passes the one-type test anyway",
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_7": ON_CPU,
    "fastif.curvature.spectrum.x_lanczos_extremes__mutmut_9": ON_CPU,
    "fastif.curvature.spectrum.x_hutchinson_trace__mutmut_1":
        "equivalent: the only caller, estimate_spectrum, always passes the seed",
    "fastif.engine.xǁInfluenceEngineǁscores_by_jvp__mutmut_1":
        "equivalent: the default batch size only regroups examples whose scores are computed one by one",
    "fastif.curvature.solvers.xǁKroneckerSolverǁsolve__mutmut_40":
        "equivalent: inverse_apply already returns the vectors' dtype (Tensor.to(None) is a no-op)",
    "fastif.curvature.iterative.x_lissa__mutmut_50": BUFFER,
    "fastif.curvature.iterative.x_lissa__mutmut_53": BUFFER,
    "fastif.curvature.iterative.x_lissa__mutmut_76": ALARM,
    "fastif.scoring.x_place__mutmut_3": FLOAT_CHUNKS,
    "fastif.scoring.x_place__mutmut_5": FLOAT_CHUNKS,
    "fastif.scoring.x_place__mutmut_21": WITHIN_CHUNK,
    "fastif.scoring.x_place__mutmut_23": WITHIN_CHUNK,
    "fastif.scoring.x_place__mutmut_25": CASE_BLIND,
    "fastif.scoring.x_place__mutmut_39": "equivalent: one boundary more past the last chunk, which in_chunk never reads",
    "fastif.scoring.xǁScorerǁ__init____mutmut_6": ON_CPU,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_1": BATCH_DEFAULT,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_16": ON_CPU,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_19": INT64,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_21": INT64,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_25": ZEROS,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_27": ZEROS,
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_34":
        "equivalent: with no rows the union is empty whatever its dtype, and nothing indexes it",
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_36":
        "equivalent: with no rows the union is empty whatever its dtype, and nothing indexes it",
    "fastif.scoring.xǁScorerǁscore_rows__mutmut_70": ON_CPU,
    "fastif.scoring.xǁScorerǁscores_by_jvp__mutmut_1": BATCH_DEFAULT,
    "fastif.scoring.xǁScorerǁscores_by_jvp__mutmut_10": ZEROS,
    "fastif.scoring.xǁScorerǁscores_by_jvp__mutmut_12": ZEROS,
    "fastif.scoring.xǁScorerǁscores_by_jvp__mutmut_16": ON_CPU,
    "fastif.scoring.xǁScorerǁscores_by_jvp__mutmut_25":
        "equivalent in its numbers: without the cached prefix activations the JVP runs the whole model and gets "
        "the same scores, only slower (a speed check, not a score check, would see it)",
    "fastif.query.x_feature_distances__mutmut_6":
        "equivalent: float32 features minus the float64 feature are promoted to float64 before squaring anyway",
    "fastif.query.xǁInfluenceǁranked__mutmut_7": CASE_BLIND,
    "fastif.engine.xǁInfluenceEngineǁcached_s_test__mutmut_44": ON_CPU,
    "fastif.curvature.solvers.x_solver_for__mutmut_35":
        "equivalent: SolverConfig allows damping_scope block only for ekfac and kfac, whose per-block solver never "
        "read the λ this line set",
    "fastif.engine.xǁInfluenceEngineǁcached_s_test__mutmut_29":
        "equivalent: the diagnostics held the curvature already and the solution's own diagnostics have none",
    "fastif.engine.xǁInfluenceEngineǁcached_s_test__mutmut_47": ON_CPU,  # the first pass's number of the same change
    "fastif.engine.xǁInfluenceEngineǁplan__mutmut_32": ON_CPU,
    "fastif.knn.x__strongest_of_both__mutmut_16": CASE_BLIND,
    "fastif.knn.x__training_sample__mutmut_12": NO_REPLACE,
    "fastif.knn.x_default_nlist__mutmut_5":
        "equivalent: an IVF index is only built from 256 vectors up, where N // 39 is at least 6",
    "fastif.knn.x_gradient_keys__mutmut_11": INT64,
    "fastif.knn.x_gradient_keys__mutmut_13": INT64,
    "fastif.knn.x_gradient_keys__mutmut_21": PROMOTED,
    "fastif.knn.x_gradient_keys__mutmut_23": PROMOTED,
    "fastif.knn.x_gradient_keys__mutmut_33": "equivalent: numpy reads any negative size as the one to infer",
    "fastif.knn.x_zero_sum_basis__mutmut_3": ZEROS,
    "fastif.knn.x_zero_sum_basis__mutmut_5": ZEROS,
    "fastif.knn.xǁRecallSampleǁof__mutmut_3": FAISS_CAST,
    "fastif.knn.xǁRecallSampleǁof__mutmut_5": FAISS_CAST,
    "fastif.knn.xǁRecallSampleǁof__mutmut_11": NO_REPLACE,
    "fastif.knn.xǁRecallSampleǁof__mutmut_45": "equivalent: faiss.knn's metric defaults to METRIC_L2",
    "workers.parallel.x__merge__mutmut_55": JSON_FLOATS,
    "workers.parallel.x__merge__mutmut_67":
        "equivalent: the result item's flag is bool(influence.cached) (workers/results.py), so None reads as False",
    "workers.parallel.x__merge__mutmut_75": "equivalent: Influence's cached defaults to False",
    "workers.parallel.x__stest_work__mutmut_25": STEST_PLAN,
    "workers.parallel.x__stest_work__mutmut_28": STEST_PLAN,
    "workers.parallel.x__stest_work__mutmut_132": STEST_PLAN,
    "workers.parallel.xǁScoringPlanǁto_bytes__mutmut_8": INT64,
    "workers.parallel.xǁScoringPlanǁto_bytes__mutmut_10": INT64,
    "workers.parallel.xǁScoringPlanǁto_bytes__mutmut_14": INT64,
    "workers.parallel.xǁScoringPlanǁto_bytes__mutmut_16": INT64,
}


def mutant_names(only: list[str] | None = None) -> list[str]:
    """mutmut name globs of the targets, or of those whose module path contains one of ``only``."""
    return [glob for module, globs in TARGETS.items() if not only or any(part in module for part in only)
            for glob in globs]


def _mutmut(names: list[str], max_children: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    clock = time.monotonic()
    subprocess.call([str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(max_children), *names],
                    cwd=ROOT, env=env)
    return time.monotonic() - clock


def run(max_children: int, only: list[str] | None = None) -> None:
    """Every target mutant (or those of ``only``); the results are kept as the first pass (``mutants/first-pass.json``)."""
    seconds = _mutmut(mutant_names(only), max_children)
    TIMINGS.parent.mkdir(exist_ok=True)
    TIMINGS.write_text(json.dumps({"seconds": seconds, "max_children": max_children,
                                   "finished": time.strftime("%Y-%m-%d %H:%M")}))
    keep_first_pass()


def again(max_children: int, only: list[str] | None = None) -> None:
    """A second pass of every target mutant from a fresh copy, keeping the first pass that the report compares with."""
    kept = {path: path.read_text() for path in (FIRST_PASS, FIRST_PASS_SURVIVORS, TIMINGS) if path.is_file()}
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # mutmut keeps a result until its function changes
    seconds = _mutmut(mutant_names(only), max_children)
    for path, text in kept.items():
        path.write_text(text)
    timing = json.loads(kept[TIMINGS]) if TIMINGS in kept else {"seconds": seconds, "max_children": max_children}
    TIMINGS.write_text(json.dumps({**timing, "again_seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M")}))


def confirm_verdicts() -> None:
    """Record the diff each current survivor's verdict was read against (run after checking the verdicts by hand)."""
    codes = results()
    recorded = json.loads(VERDICT_DIFFS.read_text()) if VERDICT_DIFFS.is_file() else {}
    recorded.update({name: one_line_diff(name) for name, code in codes.items() if name in VERDICTS and survived(code)})
    VERDICT_DIFFS.write_text(json.dumps({name: recorded[name] for name in sorted(recorded) if name in VERDICTS},
                                        indent=0, ensure_ascii=False) + "\n")


def keep_first_pass() -> None:
    """The results as they stand, and each survivor's diff, as the first pass that reruns and the report compare with."""
    codes = results()
    FIRST_PASS.write_text(json.dumps(codes, indent=0, sort_keys=True))
    diffs = {name: one_line_diff(name) for name, code in codes.items() if module_of(name) and survived(code)}
    FIRST_PASS_SURVIVORS.write_text(json.dumps(diffs, indent=0, sort_keys=True, ensure_ascii=False))


def survived(code: int | None) -> bool:
    return code is not None and status_of(code) not in CAUGHT and status_of(code) != "timeout"


def rerun(max_children: int) -> None:
    """The first pass's survivors (and any mutant it did not reach) again, against the tests as they are now."""
    first = json.loads(FIRST_PASS.read_text())
    names = [n for n, code in first.items() if module_of(n) and (code is None or survived(code))]
    if names:
        seconds = _mutmut(names, max_children)
        timing = json.loads(TIMINGS.read_text())
        TIMINGS.write_text(json.dumps({**timing, "rerun_seconds": seconds, "rerun_mutants": len(names)}))


def module_of(name: str) -> str | None:
    from fnmatch import fnmatchcase

    for module, globs in TARGETS.items():
        if any(fnmatchcase(name, glob) for glob in globs):
            return module
    return None


def results() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def source_of(name: str) -> Path:
    """The source file a mutant belongs to (its ``mutants/<path>.meta`` lists it)."""
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        if name in json.loads(meta.read_text())["exit_code_by_key"]:
            return meta.relative_to(ROOT / "mutants").with_suffix("")
    raise KeyError(name)


def one_line_diff(name: str) -> str:
    """The changed lines of the mutant, as `old` → `new` (mutmut's own diff, read in this process)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        shown = get_diff_for_mutant(name, path=source_of(name))
    finally:
        os.chdir(here)
    removed = [line[1:].strip() for line in shown.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in shown.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return f"`{' / '.join(removed)[:160]}` → `{' / '.join(added)[:160]}`"


def _table(codes: dict[str, int | None]) -> tuple[list[str], dict[str, list[str]], float]:
    """The per-module table of ``codes``, the survivors by module, and the overall score."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, code in sorted(codes.items()):
        module = module_of(name)
        if module is None:
            continue
        status = status_of(code)
        by_module[module][status] += 1
        if survived(code):
            survivors[module].append(name)
    lines = ["| module | mutants | not run | killed | timeout | survived | of which equivalent | score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    totals: Counter = Counter()
    for module in TARGETS:
        counts = by_module.get(module, Counter())
        equivalent = sum(1 for n in survivors[module] if VERDICTS.get(n, "").startswith("equivalent"))
        killed = sum(counts[c] for c in CAUGHT)
        row = {"total": sum(counts.values()), "not run": counts["not checked"], "killed": killed,
               "timeout": counts["timeout"], "survived": counts["survived"] + counts["suspicious"] + counts["no tests"],
               "equivalent": equivalent}
        totals.update(row)
        counted = row["total"] - row["not run"] - equivalent
        score = (killed + row["timeout"]) / counted if counted else float("nan")
        lines.append(f"| {module} | {row['total']} | {row['not run']} | {killed} | {row['timeout']} | "
                     f"{row['survived']} | {equivalent} | {score:.1%} |")
    counted = totals["total"] - totals["not run"] - totals["equivalent"]
    overall = (totals["killed"] + totals["timeout"]) / counted if counted else float("nan")
    lines.append(f"| **all** | {totals['total']} | {totals['not run']} | {totals['killed']} | {totals['timeout']} | "
                 f"{totals['survived']} | {totals['equivalent']} | **{overall:.1%}** |")
    return lines, survivors, overall


def report() -> str:
    codes = results()
    first = json.loads(FIRST_PASS.read_text()) if FIRST_PASS.is_file() else codes
    timing = json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}
    table, survivors, _ = _table(codes)
    lines = ["# Mutation testing", "",
             "`make mutate` (bench/mutation.py; mutmut, configured in pyproject.toml's `[tool.mutmut]`): each mutant "
             "is one small change to one function of the modules below (an operator, a constant, an argument "
             "dropped or replaced by None, a string), run against the fast tests that reach that function, "
             "fastest first. Killed: a test failed. Survived: every test passed. A survivor is equivalent when "
             "nothing a caller can observe changes; each one below says why. Score: (killed + timeout) / "
             "(mutants run − equivalent survivors); a timeout is a mutant that made a test run past its limit (an "
             "endless loop): caught. Lines that only raise or spell out a message for people are not mutated. "
             "Of fastif/engine.py only the query's steps are a target (plan, candidates, the s_test cache, "
             "influences; the scoring itself is fastif/scoring.py), of fastif/curvature/kfac.py the fitted "
             "factors' algebra and storage (not the fit, which "
             "the slower tests/test_engine_curvature.py checks on real models), of workers/parallel.py everything "
             "but the task wrapper's error plumbing.", ""]
    if timing.get("note"):
        lines += [timing["note"], ""]
    elif timing:
        line = (f"Last run: {timing.get('finished')}, {timing['seconds'] / 60:.0f} min for every mutant, "
                f"{timing['max_children']} at a time, on this 2-core machine")
        if "again_seconds" in timing:
            line += (f"; after the tests written for its survivors every mutant ran again "
                     f"({timing['again_seconds'] / 60:.0f} min)")
        if "rerun_seconds" in timing:
            line += (f"; the {timing['rerun_mutants']} survivors of that pass were run again against the tests "
                     f"written for them ({timing['rerun_seconds'] / 60:.0f} min)")
        lines += [line + ".", ""]
    lines += ["## Score", ""] + table + [""]
    if first is not codes and any(first.get(n) != c for n, c in codes.items()):
        first_table, _, _ = _table(first)
        lines += ["The first pass, before the tests written for its survivors:", ""] + first_table + [""]
    lines += ["## Survivors", "",
              "Every mutant that survived a pass, with its change and what became of it: the test that now kills "
              "it, or why it is equivalent.", ""]
    then = json.loads(FIRST_PASS_SURVIVORS.read_text()) if FIRST_PASS_SURVIVORS.is_file() else {}
    verdict_diffs = json.loads(VERDICT_DIFFS.read_text()) if VERDICT_DIFFS.is_file() else {}
    for module in TARGETS:
        names = sorted({n for n, c in first.items() if module_of(n) == module and survived(c)} | set(survivors[module]))
        if not names:
            continue
        lines += [f"### {module}", ""]
        for name in names:
            status = status_of(codes.get(name))
            changed = name in then and (codes.get(name) is None or then[name] != one_line_diff(name))
            if changed and name not in survivors[module]:
                verdict = f"its function changed since: {CHANGED.get(name, 'its mutants were run again, renumbered')}"
                lines.append(f"- `{name}` (first pass): {then[name]} — {verdict}")
                continue
            if codes.get(name) is None:
                verdict = "not run by the last pass"
            elif not survived(codes.get(name)):
                verdict = f"now {status} by {killed_by(name)}"
            else:
                verdict = VERDICTS.get(name, "**open**: no test kills it yet")
                written_for = verdict_diffs.get(name)
                if name in VERDICTS and written_for != one_line_diff(name):
                    verdict = f"**stale verdict**, written for {written_for}: read this mutant again"
            lines.append(f"- `{name}` ({status}): {one_line_diff(name)} — {verdict}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["run", "rerun", "again", "report", "all", "confirm"])
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated parts of module paths, e.g. parallel,keys")
    args = parser.parse_args()
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    if args.what in ("run", "all"):
        run(args.max_children, only)
    if args.what == "rerun":
        rerun(args.max_children)
    if args.what == "again":
        again(args.max_children, only)
    if args.what == "confirm":
        confirm_verdicts()
    if args.what in ("report", "all"):
        # a run of some targets reports into mutants/, so that it does not replace the whole run's committed report
        out = ROOT / "mutants" / f"mutation-{'-'.join(only)}.md" if only else RESULTS
        out.write_text(report())
        print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
