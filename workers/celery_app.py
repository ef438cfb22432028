"""The worker side of the Celery app: task registration and the heartbeat.

Run with ``fastif worker`` (or ``celery -A workers.celery_app worker -Q cpu,accel``).
Nothing here touches CUDA: models load lazily inside each pool process, after the fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from functools import partial

import redis
from celery.signals import (task_prerun, task_retry, task_success, worker_init, worker_process_init, worker_ready,
                            worker_shutdown)

from records import inflight, keys
from records.celery_app import BUILD_EIGENVALUES, BUILD_MODEL, BUILD_SHARD, BUILD_SPECTRUM, CORRECT, EXPLAIN, GRAPH, INFLUENCE, QUALITY, SELF_INFLUENCE, make_celery
from records.heartbeat import beat
from records.settings import get_settings

from . import applications, dataset, parallel, quality
from .build import build_eigenvalues, build_shard, build_spectrum, run_build
from .context import context
from .influence import run_influence
from .results import ITEM_MODELS
from .runner import Work, run_job

log = logging.getLogger("fastif.workers")
celery_app = make_celery(get_settings())
# Drawn when the worker's main process imports this module; its pool processes, forked from it,
# share it. A worker restarted under the same hostname draws another, so the reaper can tell them apart.
BOOT_ID = uuid.uuid4().hex

# A Redis outage mid-job: the message comes back after a pause instead of being dropped.
_RETRY = {"autoretry_for": (redis.RedisError,), "retry_backoff": 2, "retry_backoff_max": 30, "max_retries": 20}


def _send(name: str, args: list, task_id: str | None = None) -> None:
    """Publish a task by name (``task_id``: the one it had, when sending it again)."""
    celery_app.send_task(name, args=args, task_id=task_id, ignore_result=True)


def _job_task(name: str, kind: str, work: Work):
    """The task that runs a job of ``kind``: ``work`` computes it, its items are stored as the kind's contract model."""

    def run(job_id: str) -> str:
        return run_job(job_id, work, ITEM_MODELS[kind])

    run.__name__ = run.__qualname__ = kind
    return celery_app.task(name=name, **_RETRY)(run)


influence = _job_task(INFLUENCE, "influence", partial(run_influence, send=_send))
explain = _job_task(EXPLAIN, "explain", partial(applications.run_explain, send=_send))
graph = _job_task(GRAPH, "graph", applications.run_graph)
correct = _job_task(CORRECT, "correct", partial(applications.run_correct, send=_send))
self_influence = _job_task(SELF_INFLUENCE, "self_influence", partial(applications.run_self_influence, send=_send))
model_quality = _job_task(QUALITY, "quality", quality.run_quality)


@celery_app.task(name=BUILD_MODEL, **_RETRY)
def build_model(model_id: str) -> str:
    ctx = context()
    model = ctx.models.get(model_id)
    if model is None or not model.build_job_id:
        return "skipped"
    return run_job(model.build_job_id, partial(run_build, model_id=model_id, send=_send), ITEM_MODELS["build_model"],
                   on_failure=partial(ctx.models.set_failed, model_id))


@celery_app.task(name=BUILD_SHARD, **_RETRY)
def build_model_shard(job_id: str, model_id: str, shard: int) -> str:
    return build_shard(job_id, model_id, shard, on_failure=partial(context().models.set_failed, model_id), send=_send)


@celery_app.task(name=BUILD_SPECTRUM, **_RETRY)
def build_model_spectrum(job_id: str, model_id: str) -> str:
    return build_spectrum(job_id, model_id, on_failure=partial(context().models.set_failed, model_id))


@celery_app.task(name=BUILD_EIGENVALUES, **_RETRY)
def build_model_eigenvalues(job_id: str, model_id: str, part: int) -> str:
    return build_eigenvalues(job_id, model_id, part, on_failure=partial(context().models.set_failed, model_id))


@celery_app.task(name=parallel.STEST_SHARD, **_RETRY)
def stest_shard(job_id: str, shard: int) -> str:
    return parallel.stest_shard(job_id, shard, _send)


@celery_app.task(name=dataset.DATASET_SHARD, **_RETRY)
def dataset_shard(job_id: str, shard: int) -> str:
    return dataset.dataset_shard(job_id, shard, _send)


@celery_app.task(name=parallel.SCORE_SHARD, **_RETRY)
def score_shard(job_id: str, shard: int) -> str:
    return parallel.score_shard(job_id, shard)


class Heartbeat:
    """Beats every ``interval_s`` from the worker's main process until shutdown, and then reaps
    the tasks of workers that died whole (records/inflight.py)."""

    def __init__(self, hostname: str, interval_s: float):
        self.hostname = hostname
        self.interval_s = interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        client = context().redis
        info = {"pid": os.getpid(), "boot": BOOT_ID, "host": socket.gethostname(),
                "queues": os.environ.get("FASTIF_QUEUES", "")}
        # Dead only when missing at every look for longer than two beats (see Reaper).
        reaper = inflight.Reaper(client, _send, grace_s=2.5 * self.interval_s)
        while not self.stop.is_set():
            try:
                beat(client, self.hostname, info, ttl_s=max(1, round(3 * self.interval_s)))
                for task in reaper.reap():
                    log.warning("sent %s %s again: its worker %s died", task.name, task.args, task.worker)
            except redis.RedisError as err:
                log.warning("heartbeat failed: %s", err)
            self.stop.wait(self.interval_s)


@task_prerun.connect
def _task_started(task_id=None, task=None, args=None, **_kwargs) -> None:
    """In the pool process: this task runs here now."""
    try:
        inflight.started(context().redis, task_id, task.request.hostname, BOOT_ID, task.name, list(args or ()))
    except redis.RedisError as err:  # the task itself will meet the outage and retry
        log.warning("could not record task %s as in flight: %s", task_id, err)


@task_success.connect
def _task_finished(sender=None, **_kwargs) -> None:
    """In the pool process: the task returned, so nothing is left to send again.

    Not task_postrun: that fires too when the pool process is being terminated (a SIGTERM to
    the worker's process group when a stack stops), and the task, whose message the dying
    worker may not manage to requeue, would then be forgotten.
    """
    _clear(sender.request.id)


@task_retry.connect
def _task_retried(request=None, **_kwargs) -> None:
    """The task handed itself back for a retry: a new message, recorded when it runs."""
    _clear(request.id)


def _clear(task_id: str) -> None:
    try:
        inflight.finished(context().redis, task_id)
    except redis.RedisError as err:
        log.warning("could not clear task %s from in flight: %s", task_id, err)


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    global _heartbeat
    _heartbeat = Heartbeat(getattr(sender, "hostname", socket.gethostname()), context().settings.heartbeat_interval_s)
    threading.Thread(target=_heartbeat.run, name="fastif-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop.set()
        try:
            context().redis.delete(keys.worker(_heartbeat.hostname))
        except redis.RedisError:
            pass


# The worker's WorkController, kept by its main process before the pool forks: the pool
# processes read how many they are from it (its --concurrency, resolved by then).
_controller = None


@worker_init.connect
def _keep_controller(sender=None, **_kwargs) -> None:
    global _controller
    _controller = sender


def pool_processes() -> int:
    """The worker's prefork pool size (1 when not known)."""
    concurrency = getattr(_controller, "concurrency", None)
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else 1


@worker_process_init.connect
def _limit_threads(**_kwargs) -> None:
    """In each pool process, after the fork: its share of the cores, or FASTIF_TORCH_THREADS (fastif/threads.py)."""
    import torch

    from fastif.threads import available_cores, torch_threads

    cores, processes = available_cores(), pool_processes()
    try:
        threads = torch_threads(cores, processes, os.environ)
    except ValueError as err:  # a pool process that raised here would be forked again and again
        threads = torch_threads(cores, processes, {})
        log.error("%s; each of %d pool processes uses %d of %d cores", err, processes, threads, cores)
    torch.set_num_threads(threads)
