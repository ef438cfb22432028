"""Starting a job: the one way every job route checks its request, records the job and sends its task.

A job route takes its checks from here in the order of its body: the sizes (413), the model
through `ReadyModel` (404 model-not-found, 409 model-not-ready), the labels against that model
(422 unknown-label), and then hands the checked body to `StartJob`. That records the job, or
finds the one the same Idempotency-Key made (429 queue-full past FASTIF_MAX_QUEUED_JOBS), sends
its task by name when the job is new (503 when the broker is down), and sets the Location.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import datafiles

from fastapi import Depends, Header, Response
from pydantic import BaseModel

from api_schemas import ExplainRequest, GraphRequest, InfluenceRequest, InputsFile, Job, Model
from records.settings import Settings

from ..enqueue import send_job_task
from ..errors import ProblemError
from ..paths import resolve_in_root
from .deps import CallerDep, CeleryDep, JobsDep, ModelsDep, SettingsDep

# Visible ASCII only: the key becomes part of a Redis key name and of log lines.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# Inline example sets (correct's anchors and evaluation, quality's held-out examples) may hold
# this many times the inputs limit; the body limit still applies.
INLINE_SET_FACTOR = 100
BodyT = TypeVar("BodyT", bound=BaseModel)


def idempotency_key(key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> str | None:
    """The Idempotency-Key header; 422 invalid-request unless it is 1-255 visible ASCII characters."""
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise ProblemError("invalid-request", "Idempotency-Key must be 1-255 visible ASCII characters",
                           errors=[{"loc": ["header", "Idempotency-Key"], "msg": "invalid", "type": "value_error"}])
    return key


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


class ReadyModelLookup:
    """The model a job is to run on, by id: 404 model-not-found unless it exists, 409 model-not-ready
    unless its build has finished.

    A dependency that looks up on call, because most routes find the model's id in their body,
    which their own size checks read first.
    """

    def __init__(self, models: ModelsDep) -> None:
        self.models = models

    def __call__(self, model_id: str) -> Model:
        model = self.models.require(model_id)  # ModelNotFound -> 404 model-not-found
        if model.status != "ready":
            raise ProblemError("model-not-ready", f"model {model.id} is {model.status}")
        return model


ReadyModel = Annotated[ReadyModelLookup, Depends()]


def check_inputs(items: list[Any], where: str, settings: Settings, *, inline_set: bool = False) -> None:
    """413 when there are more inputs, or longer texts, than this service accepts.

    `where` names the list in the body (`inputs`, `evaluation.examples`); an inline example set
    (`inline_set`) may hold INLINE_SET_FACTOR times FASTIF_MAX_INPUTS.
    """
    max_items = settings.max_inputs * (INLINE_SET_FACTOR if inline_set else 1)
    if len(items) > max_items:
        raise ProblemError("too-many-inputs", f"{len(items)} {where}; at most {max_items} per request")
    for i, item in enumerate(items):
        for field in ("text", "text_pair"):
            value = getattr(item, field)
            if value is not None and len(value) > settings.max_text_chars:
                raise ProblemError(
                    "text-too-long", f"{where}[{i}].{field} has {len(value)} characters; at most {settings.max_text_chars}",
                    errors=[{"loc": ["body", where, i, field], "msg": "too long", "type": "text_too_long"}],
                )


def check_labels(items: list[Any], where: str, model: Model) -> None:
    """422 unknown-label unless every given label names, or indexes, one of the model's labels."""
    if model.labels is None:
        return
    for i, item in enumerate(items):
        label = item.label
        if label is None:
            continue
        known = label in model.labels if isinstance(label, str) else 0 <= label < len(model.labels)
        if not known:
            raise ProblemError(
                "unknown-label", f"{where}[{i}].label {label!r} is not one of {model.labels}",
                errors=[{"loc": ["body", where, i, "label"], "msg": "unknown label", "type": "unknown_label"}],
            )


class JobStarter:
    """Records a checked job request, owned by the caller's key, and sends its task; call it last in a job route.

    The Idempotency-Key is checked when the dependency is built, before the route's own checks.
    """

    def __init__(self, response: Response, settings: SettingsDep, jobs: JobsDep, celery: CeleryDep,
                 idempotency_key: IdempotencyKey, caller: CallerDep) -> None:
        self.response = response
        self.owner = caller.name
        self.settings = settings
        self.jobs = jobs
        self.celery = celery
        self.idempotency_key = idempotency_key

    def __call__(self, kind: str, task: str, body: BaseModel, model: Model, inputs_total: int | None = None) -> Job:
        """The job of `kind` on `model` for `body` (new, or the replay of the same key and body); `inputs_total`
        makes it a dataset job of that many inputs."""
        job, created = self.jobs.create_or_replay(kind, model.id, body.model_dump(mode="json"), self.idempotency_key,
                                                  owner=self.owner, max_queued=self.settings.max_queued_jobs,
                                                  inputs_total=inputs_total)
        if created:
            send_job_task(self.celery, self.jobs, task, [job.id], job.id)
            job = self.jobs.get(job.id) or job  # a worker may already have picked it up
        self.response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job


StartJob = Annotated[JobStarter, Depends()]


def with_output_path(body: BodyT, settings: Settings) -> BodyT:
    """`body` with its `output_path` resolved inside the data root (relative, as the workers resolve it again).

    422 path-outside-data-root past the root, path-not-found when its folder does not exist, and
    invalid-request when it names a folder. The file itself may or may not exist: it is replaced.
    """
    raw = getattr(body, "output_path", None)
    if raw is None:
        return body
    relative = resolve_in_root(settings.data_root, raw, "output_path", must_exist=False)
    resolved = settings.data_root.resolve() / relative
    loc = {"loc": ["body", "output_path"]}
    if resolved.is_dir():
        raise ProblemError("invalid-request", f"output_path {raw!r} is a folder; name the file to write",
                           errors=[{**loc, "msg": "is a folder", "type": "value_error"}])
    if not resolved.parent.is_dir():
        raise ProblemError("path-not-found", f"the folder of output_path {raw!r} does not exist in the data root",
                           errors=[{**loc, "msg": "folder not found", "type": "path_not_found"}])
    return body.model_copy(update={"output_path": relative})


def start_inputs_job(kind: str, task: str, body: InfluenceRequest | ExplainRequest | GraphRequest,
                     settings: Settings, ready_model: ReadyModelLookup, start_job: JobStarter) -> Job:
    """The job of a body that names a model and lists `inputs` (or reads them from `inputs_from`): their sizes,
    the model, their labels, start."""
    inputs_from = getattr(body, "inputs_from", None)
    if inputs_from is None:
        check_inputs(body.inputs, "inputs", settings)
    model = ready_model(body.model_id)
    if inputs_from is None:
        check_labels(body.inputs, "inputs", model)
        return start_job(kind, task, with_output_path(body, settings), model)
    checked, count = checked_inputs_file(inputs_from, settings, model)
    return start_job(kind, task, not_over_inputs(with_output_path(body.model_copy(update={"inputs_from": checked}),
                                                                  settings)), model, inputs_total=count)


def not_over_inputs(body: BodyT) -> BodyT:
    """422 invalid-request when a dataset job's `output_path` names its own input file (both are relative by now)."""
    source, output = getattr(body, "inputs_from", None), getattr(body, "output_path", None)
    if source is not None and output is not None and output == source.path:
        raise ProblemError("invalid-request", f"output_path {output!r} is the job's own input file; name another",
                           errors=[{"loc": ["body", "output_path"], "msg": "is the input file", "type": "value_error"}])
    return body


_DATA_FILE_PROBLEMS: dict[type[datafiles.DataFileError], str] = {
    datafiles.TooManyRows: "too-many-inputs", datafiles.TextTooLong: "text-too-long",
    datafiles.UnknownLabel: "unknown-label", datafiles.EmptyFile: "empty-data",
}


def checked_inputs_file(source: InputsFile, settings: Settings, model: Model) -> tuple[InputsFile, int]:
    """A dataset job's input file, read whole as the job will read it: with its path made relative and its sha256,
    and how many inputs it holds.

    422 path-outside-data-root / path-not-found for the path; 413 too-many-inputs past
    FASTIF_MAX_DATASET_INPUTS rows and text-too-long past FASTIF_MAX_TEXT_CHARS; 422 unknown-label,
    empty-data, and invalid-data-file for a row that cannot be read, each naming the file, the line
    and the field (the file as the request names it, never the server's folders).
    """
    relative = resolve_in_root(settings.data_root, source.path, "inputs_from.path")
    file = settings.data_root.resolve() / relative
    try:
        inputs, sha256 = datafiles.read_pinned_inputs(file, source.sha256, **source.reading(model, max_rows=settings.max_dataset_inputs,
                                                                           max_text_chars=settings.max_text_chars))
    except datafiles.FileChanged as err:
        if source.sha256 is None:  # changed while the API read it
            raise ProblemError("invalid-data-file", str(err).replace(str(file), source.path),
                               errors=[{"loc": ["body", "inputs_from", "path"], "msg": "changed while read",
                                        "type": "invalid_data_file"}]) from None
        raise ProblemError("invalid-request", f"inputs_from.sha256 does not match {source.path!r}",
                           errors=[{"loc": ["body", "inputs_from", "sha256"], "msg": "does not match the file",
                                    "type": "value_error"}]) from None
    except datafiles.DataFileError as err:
        message = str(err).replace(str(file), source.path)
        slug = next((s for cls, s in _DATA_FILE_PROBLEMS.items() if isinstance(err, cls)), "invalid-data-file")
        raise ProblemError(slug, message, errors=[{"loc": ["body", "inputs_from", "path"], "msg": message,
                                                    "type": slug.replace("-", "_")}]) from None
    except OSError as err:  # a folder that cannot be listed, a file that cannot be opened
        raise ProblemError("invalid-data-file", f"inputs_from.path {source.path!r} cannot be read ({err.strerror})",
                           errors=[{"loc": ["body", "inputs_from", "path"], "msg": "unreadable",
                                    "type": "invalid_data_file"}]) from None
    return source.model_copy(update={"path": relative, "sha256": sha256}), len(inputs)
