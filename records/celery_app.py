"""The Celery application both sides share: JSON only, late acks, one queue per resource.

The API only sends tasks by name (it never imports the task code); workers register
the tasks on the app this returns.
"""

from __future__ import annotations

from celery import Celery

from .settings import Settings

CPU_QUEUE = "cpu"
ACCEL_QUEUE = "accel"

# Task names used over the wire; each takes one id argument, but for the shards of a job.
BUILD_MODEL = "fastif.build_model"  # (model_id)
BUILD_SHARD = "fastif.build_shard"  # (job_id, model_id, shard): one shard of a build (workers/build.py)
BUILD_SPECTRUM = "fastif.build_spectrum"  # (job_id, model_id): a build's spectrum, beside its EK-FAC fit
BUILD_EIGENVALUES = "fastif.build_eigenvalues"  # (job_id, model_id, part): a part of a build's EK-FAC fit
INFLUENCE = "fastif.influence"  # (job_id)
EXPLAIN = "fastif.explain"  # (job_id)
GRAPH = "fastif.graph"  # (job_id)
CORRECT = "fastif.correct"  # (job_id)
SELF_INFLUENCE = "fastif.self_influence"  # (job_id)
QUALITY = "fastif.quality"  # (job_id)


def make_celery(settings: Settings) -> Celery:
    """A Celery app on settings' Redis, configured as DESIGN.md section 3 asks."""
    url = settings.effective_redis_url
    app = Celery("fastif", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # The job record is the source of truth; Celery results would only fill Redis.
        task_ignore_result=True,
        # Ack after the task ran and requeue when the worker dies, so a job is never lost;
        # the job record's delivery counter stops endless redelivery.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Plain dicts (Celery builds the queues) keep records/ free of direct kombu imports.
        task_queues={name: {"exchange": name, "routing_key": name} for name in (CPU_QUEUE, ACCEL_QUEUE)},
        task_default_queue=ACCEL_QUEUE,
        task_routes={BUILD_MODEL: {"queue": CPU_QUEUE}, BUILD_SHARD: {"queue": CPU_QUEUE}, BUILD_SPECTRUM: {"queue": CPU_QUEUE},
                     BUILD_EIGENVALUES: {"queue": CPU_QUEUE},
                     "fastif.*": {"queue": ACCEL_QUEUE}},
        # Publishing must fail fast when Redis is down: the API answers 503 instead of hanging.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        broker_connection_timeout=2.0,
    )
    return app
