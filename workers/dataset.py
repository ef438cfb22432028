"""Dataset jobs (`inputs_from`): a file's inputs in shards that any worker takes, each shard's items readable as it ends.

Influence, explain and self-influence jobs that name a file instead of inline inputs run here.
Where a job stands is its shard state's phase (workers/shards.py), moved by compare-and-set:

    (none) --coordinator--> shards --the shard that stores the last items, s--> finish-s

- coordinate (the job's own task, ``start_dataset``): read the file, refusing it if its bytes
  are not those the API checked (its sha256), store each shard's inputs in the shard state,
  record the split on the job, move none -> shards, and send the first shards, one per lane
  (``dataset_shards_in_flight``, 8 by default). A coordinator delivered again (its worker died)
  finds the phase set and sends only the shards it had not sent (workers/shards.py ``send_once``).
- lanes: each shard, once its items are stored, sends the shard one lane count after it. So a
  large file's job holds at most that many tasks in the queue at a time, and jobs submitted after it
  queue between its shards instead of behind all of them.
- shard s: its inputs through the kind's computation, one batched solve for all of them (and no
  per-input cache of gradients and s_test, which would hold megabytes per input in Redis), and
  its items stored at once under the job (records/jobs.py ``store_shard_items``), where the
  results pages and the JSON Lines stream read them in input order while the job runs; the
  job's progress counts inputs done over all shards. The shard that finds every shard stored
  and wins shards -> finish-s writes `output_path` and marks the job succeeded; its own
  redelivery finishes if its worker dies there.

Cancelling stops the running shards at their next check and skips the rest; the shards
already stored stay readable. A shard started more than max_deliveries times fails the job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import datafiles
from api_schemas import (
    TERMINAL_STATUSES,
    ExplainItem,
    ExplainRequest,
    InfluenceRequest,
    InputsFile,
    Model,
    ResultItem,
    SelfInfluenceInputItem,
    SelfInfluenceRequest,
)
from fastif import CancelledError, Query
from fastif.applications import inputs_self_influence
from records.keys import shard_state

from .configs import solver_config
from .context import WorkerContext, context
from .data_files import resolve
from .registry import engine_and_cache, ready_model
from .results import explain_items, influence_items, stored_items
from .runner import HANDED_ON, HandedOn, JobFailed, JobRun, write_output
from .shards import advance, phase_of, run_shard, send_once

DATASET_SHARD = "fastif.dataset_shard"
SHARDS = "shards"

SendTask = Callable[[str, list], None]
"""``send(task_name, args)``: publish a task (the Celery app's send_task)."""


# -- coordinate ----------------------------------------------------------------------------------
def start_dataset(run: JobRun, model_id: str, source: InputsFile, send: SendTask) -> HandedOn:
    """The coordinator: split the file's inputs into shards once, then send every shard not stored yet."""
    jobs = run.ctx.jobs
    phase = phase_of(run.ctx, run.job_id)
    if phase is None:
        inputs = read_inputs(run, ready_model(run, model_id), source)
        shards = math.ceil(len(inputs) / source.shard_inputs)
        pipe = run.ctx.redis.pipeline(transaction=False)
        for shard in range(shards):
            part = inputs[shard * source.shard_inputs:(shard + 1) * source.shard_inputs]
            pipe.set(shard_state(run.job_id, "inputs", shard), json.dumps([[i.text, i.text_pair, i.label] for i in part]),
                     ex=run.ctx.settings.result_ttl_s)
        pipe.execute()
        jobs.split_into_shards(run.job_id, shards, source.shard_inputs)
        # Fixed for the job before any shard runs: every shard hands on to the one `lanes` after it.
        run.ctx.redis.set(shard_state(run.job_id, "lanes"), run.ctx.settings.dataset_shards_in_flight, nx=True,
                          ex=run.ctx.settings.result_ttl_s)
        advance(run.ctx, run.job_id, None, SHARDS)  # a coordinator delivered again found the phase unset too
    elif phase != SHARDS:
        return HANDED_ON  # a shard is finishing the job
    send_once(run.ctx, run.job_id, SHARDS, DATASET_SHARD, range(min(_lanes(run), jobs.shard_count(run.job_id) or 0)), send)
    return HANDED_ON


def _lanes(run: JobRun) -> int:
    """How many of the job's shards are in the queue or running at once (recorded when it was split)."""
    return int(run.ctx.redis.get(shard_state(run.job_id, "lanes")) or run.ctx.settings.dataset_shards_in_flight)


def read_inputs(run: JobRun, model: Model, source: InputsFile) -> list[datafiles.InputRow]:
    """The file's inputs, read as the API read them; the job fails if its bytes are not those the API checked."""
    path = resolve(run, source.path)
    settings = run.ctx.settings
    try:
        inputs, _ = datafiles.read_pinned_inputs(path, source.sha256, **source.reading(
            model, max_rows=settings.max_dataset_inputs, max_text_chars=settings.max_text_chars))
        return inputs
    except datafiles.FileChanged:
        raise JobFailed("inputs-changed", f"inputs_from {source.path!r} changed after the job was submitted; "
                                          "submit it again to read the file as it is now") from None
    except (datafiles.DataFileError, OSError) as err:
        raise JobFailed("invalid-data-file", str(err).replace(str(path), source.path)) from None


# -- a shard -------------------------------------------------------------------------------------
def dataset_shard(job_id: str, shard: int, send: SendTask) -> str:
    return run_shard(job_id, shard, "inputs", partial(_shard_work, shard=shard, send=send),
                     on_failure=lambda _code, _message: _let_inputs_go(context(), job_id))


def _let_inputs_go(ctx: WorkerContext, job_id: str) -> None:
    """Delete the job's stored inputs (a job that is over reads them no more; a large file's take hundreds of MB)."""
    count = ctx.jobs.shard_count(job_id) or 0
    if count:
        ctx.redis.delete(*(shard_state(job_id, "inputs", s) for s in range(count)))


def _shard_work(run: JobRun, shard: int, send: SendTask) -> None:
    try:
        _shard_part(run, shard, send)
    except CancelledError:
        _let_inputs_go(run.ctx, run.job_id)
        raise


def _shard_part(run: JobRun, shard: int, send: SendTask) -> None:
    jobs = run.ctx.jobs
    if jobs.cancel_requested(run.job_id):
        raise CancelledError("cancelled before this shard started")
    phase, finisher = phase_of(run.ctx, run.job_id), f"finish-{shard}"
    if phase == SHARDS:
        stored = jobs.stored_shards(run.job_id)
        done = len(stored) if shard in stored else jobs.store_shard_items(run.job_id, shard, _items_of(run, shard))
        count = jobs.shard_count(run.job_id) or 0
        # Its lane's next shard, also when delivered again after storing (the first delivery may have died before this).
        send_once(run.ctx, run.job_id, SHARDS, DATASET_SHARD, [s for s in (shard + _lanes(run),) if s < count], send)
        if not (done >= count and advance(run.ctx, run.job_id, SHARDS, finisher)):
            return
    elif phase != finisher:
        return  # another shard finishes the job, or it is over
    _finish(run)


def _items_of(run: JobRun, shard: int) -> list[dict[str, Any]]:
    """Shard ``shard``'s items, numbered by their place in the file."""
    raw = run.ctx.redis.get(shard_state(run.job_id, "inputs", shard))
    if raw is None:
        raise JobFailed("internal-error", f"the inputs of shard {shard} are gone from the job's shard state")
    queries = [Query(text=text, text_pair=pair, label=label) for text, pair, label in json.loads(raw)]
    offset = shard * InputsFile.model_validate(run.request["inputs_from"]).shard_inputs
    items = shard_items(run, queries)
    for item in items:
        item["input_index"] += offset
    return items


# Inputs solved and scored together within a shard: their gradients and s_tests are each as large as the
# influence parameters (8 MB on MiniLM's top), so a shard of any size holds this many at a time; past about
# 32 the cost per input hardly falls (bench/results/batch.md).
SOLVED_TOGETHER = 32


def shard_items(run: JobRun, queries: list[Query]) -> list[dict[str, Any]]:
    """The result items of one shard's inputs, as the job's kind makes them (input_index counts from 0)."""
    items: list[dict[str, Any]] = []
    for start in range(0, len(queries), SOLVED_TOGETHER):
        part = _items_together(run, queries[start:start + SOLVED_TOGETHER])
        for item in part:
            item["input_index"] += start
        items.extend(part)
    return items


def _items_together(run: JobRun, queries: list[Query]) -> list[dict[str, Any]]:
    kind = run.ctx.jobs.require(run.job_id).kind
    request = _REQUESTS[kind].model_validate(run.request)
    # No per-input cache of gradients and s_test: a dataset's inputs are scored once, and at a few MB per input
    # (an s_test is as large as the influence parameters) a 100,000-input file would fill Redis many times over.
    engine, _ = engine_and_cache(run, ready_model(run, request.model_id))
    # The job's progress counts inputs over all shards: a shard only looks for a cancel.
    watch = run.progress.cancel_check
    if kind == "self_influence":
        return stored_items(SelfInfluenceInputItem,
                            inputs_self_influence(engine, queries, solver=solver_config(request), on_progress=watch))
    encoded, influences = engine.analyze(queries, k=request.k, solver=solver_config(request), group=False, cache=None,
                                         on_progress=watch)
    if kind == "explain":
        return stored_items(ExplainItem, explain_items(engine, encoded, influences, request.top))
    return stored_items(ResultItem, influence_items(engine, encoded, influences, request.top))


_REQUESTS = {"influence": InfluenceRequest, "explain": ExplainRequest, "self_influence": SelfInfluenceRequest}


def _finish(run: JobRun) -> None:
    """Phase finish: the items to `output_path` (streamed from the shards), the job succeeded, the inputs let go."""
    jobs = run.ctx.jobs
    job = jobs.require(run.job_id)
    if job.status in TERMINAL_STATUSES or job.cancel_requested:
        _let_inputs_go(run.ctx, run.job_id)
        return  # cancelled or failed meanwhile: no output file for a job that did not succeed
    write_output(run, jobs.iter_raw_results(run.job_id))
    jobs.succeed_in_shards(run.job_id)
    _let_inputs_go(run.ctx, run.job_id)
