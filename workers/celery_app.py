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

import redis
from celery.signals import task_prerun, task_retry, task_success, worker_process_init, worker_ready, worker_shutdown

from records import inflight, keys
from records.celery_app import BUILD_MODEL, CORRECT, EXPLAIN, GRAPH, INFLUENCE, QUALITY, SELF_INFLUENCE, make_celery
from records.heartbeat import beat
from records.settings import get_settings

from . import applications, parallel, quality
from .build import run_build
from .context import context
from .influence import run_influence
from .runner import run_job

log = logging.getLogger("fastif.workers")
celery_app = make_celery(get_settings())
# Drawn when the worker's main process imports this module; its pool processes, forked from it,
# share it. A worker restarted under the same hostname draws another, so the reaper can tell them apart.
BOOT_ID = uuid.uuid4().hex

# A Redis outage mid-job: the message comes back after a pause instead of being dropped.
_RETRY = {"autoretry_for": (redis.RedisError,), "retry_backoff": 2, "retry_backoff_max": 30, "max_retries": 20}


@celery_app.task(name=BUILD_MODEL, **_RETRY)
def build_model(model_id: str) -> str:
    ctx = context()
    model = ctx.models.get(model_id)
    if model is None or not model.build_job_id:
        return "skipped"
    return run_job(model.build_job_id, lambda run: run_build(run, model_id),
                   on_failure=lambda code, message: ctx.models.set_failed(model_id, code, message))


def _send(name: str, args: list) -> None:
    celery_app.send_task(name, args=args, ignore_result=True)


@celery_app.task(name=INFLUENCE, **_RETRY)
def influence(job_id: str) -> str:
    return run_job(job_id, lambda run: run_influence(run, lambda r, req: parallel.start_parallel(r, req, _send)))


@celery_app.task(name=parallel.STEST_SHARD, **_RETRY)
def stest_shard(job_id: str, shard: int) -> str:
    return parallel.stest_shard(job_id, shard, _send)


@celery_app.task(name=parallel.SCORE_SHARD, **_RETRY)
def score_shard(job_id: str, shard: int) -> str:
    return parallel.score_shard(job_id, shard)


def _send_job(name: str, args: list, task_id: str) -> None:
    celery_app.send_task(name, args=args, task_id=task_id, ignore_result=True)


@celery_app.task(name=EXPLAIN, **_RETRY)
def explain(job_id: str) -> str:
    return run_job(job_id, applications.run_explain)


@celery_app.task(name=GRAPH, **_RETRY)
def graph(job_id: str) -> str:
    return run_job(job_id, applications.run_graph)


@celery_app.task(name=CORRECT, **_RETRY)
def correct(job_id: str) -> str:
    return run_job(job_id, lambda run: applications.run_correct(run, _send_job))


@celery_app.task(name=SELF_INFLUENCE, **_RETRY)
def self_influence(job_id: str) -> str:
    return run_job(job_id, applications.run_self_influence)


@celery_app.task(name=QUALITY, **_RETRY)
def model_quality(job_id: str) -> str:
    return run_job(job_id, quality.run_quality)


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
        reaper = inflight.Reaper(client, _send_again, grace_s=2.5 * self.interval_s)
        while not self.stop.is_set():
            try:
                beat(client, self.hostname, info, ttl_s=max(1, round(3 * self.interval_s)))
                for task in reaper.reap():
                    log.warning("sent %s %s again: its worker %s died", task.name, task.args, task.worker)
            except redis.RedisError as err:
                log.warning("heartbeat failed: %s", err)
            self.stop.wait(self.interval_s)


def _send_again(name: str, args: list, task_id: str) -> None:
    celery_app.send_task(name, args=args, task_id=task_id, ignore_result=True)


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


@worker_process_init.connect
def _limit_threads(**_kwargs) -> None:
    """In each pool process, after the fork: its share of the CPU threads."""
    import torch

    threads = os.environ.get("FASTIF_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
