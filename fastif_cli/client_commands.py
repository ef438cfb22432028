"""``fastif models | register | submit | jobs | results | cancel``: a running FastIF service from the shell.

Each command is one or two calls of fastif_client against FASTIF_URL (or --url) with
FASTIF_API_KEY (or --api-key). Ids go to stdout, so that `JOB=$(fastif submit ...)` works;
progress and messages go to stderr. Every error is one line on stderr and a non-zero exit:
1 for what the service or the network answered, 2 for a bad command line or input file.

fastif_client (httpx, pydantic) is imported when a command runs, not when `fastif` starts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from api_schemas import Progress
    from fastif_client import FastIFClient

SERVICE_ERROR, USAGE_ERROR = 1, 2

UrlOption = Annotated[Optional[str], typer.Option("--url", envvar="FASTIF_URL", show_envvar=True,
                                                  help="the service's base URL (default http://127.0.0.1:8000)")]
ApiKeyOption = Annotated[Optional[str], typer.Option("--api-key", envvar="FASTIF_API_KEY", show_envvar=True,
                                                     help="sent as X-API-Key")]
TimeoutOption = Annotated[Optional[float], typer.Option(
    "--timeout", help="with --wait: give up waiting after this many seconds (the job goes on)")]


class SubmitKind(str, Enum):
    influence = "influence"
    explain = "explain"
    self_influence = "self-influence"


def _fail(message: str, code: int) -> None:
    # One line however the message was built (a service's detail may hold newlines).
    typer.echo(f"fastif: error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Every error of a command as one line on stderr and an exit code, never a traceback."""
    from pydantic import ValidationError

    from fastif_client import FastIFClientError

    try:
        yield
    except FastIFClientError as err:
        _fail(str(err), SERVICE_ERROR)
    except ValidationError as err:
        _fail(_validation_line(err), USAGE_ERROR)
    except OSError as err:
        _fail(f"{err.filename or ''}: {err.strerror or err}" if err.filename else str(err), USAGE_ERROR)
    except ValueError as err:
        _fail(str(err), USAGE_ERROR)


def _validation_line(err: Any) -> str:
    errors = err.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or err.title
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid {err.title}: {where}: {first.get('msg', 'invalid')}{more}"


def _client(url: str | None, api_key: str | None) -> FastIFClient:
    from fastif_client import FastIFClient

    return FastIFClient(url, api_key=api_key)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Plain aligned columns: readable, and as easy to cut or grep as to read."""
    cells = [list(headers)] + [["" if value is None else str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else ""


class ProgressBar:
    """A rich progress bar on stderr, fed by a job's progress {stage, done, total}."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.label = label
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True))
        self.task = self.bar.add_task(f"{label}: queued", total=None)

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, progress: Progress) -> None:
        self.bar.update(self.task, description=f"{self.label}: {progress.stage or 'queued'}",
                        completed=progress.done, total=progress.total)


@contextmanager
def _interrupt_note(what: str) -> Iterator[None]:
    """Ctrl-C while waiting stops the waiting, not the work: say so, and how to stop the work."""
    try:
        yield
    except KeyboardInterrupt:
        _fail(f"interrupted; {what} goes on on the service", 130)


# -- the commands ------------------------------------------------------------------------------------

def models(url: UrlOption = None, api_key: ApiKeyOption = None,
           limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100) -> None:
    """List the registered models."""
    with _reported_errors(), _client(url, api_key) as client:
        found = client.list_models(limit=limit)
    _print_table(["ID", "NAME", "STATUS", "TRAIN", "CREATED", "ERROR"],
                 [[m.id, m.name, m.status, m.num_train, _when(m.created_at), m.error.code if m.error else None]
                  for m in found])


def register(
    name: Annotated[str, typer.Argument(help="a name for people; the service gives the id")],
    model_path: Annotated[str, typer.Option(help="the Hugging Face model directory, inside the service's data root")],
    train: Annotated[str, typer.Option(help="the training data file, inside the service's data root")],
    text_field: Annotated[str, typer.Option(help="field of the training text")] = "text",
    text_pair_field: Annotated[Optional[str], typer.Option(help="field of the second text (NLI)")] = None,
    label_field: Annotated[str, typer.Option(help="field of the training label")] = "label",
    wait: Annotated[bool, typer.Option("--wait", help="wait until the model is ready, with a progress bar")] = False,
    timeout: TimeoutOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Register a model and its training data; prints the model's id."""
    request = {"name": name, "model_path": model_path,
               "train_data": {"path": train, "text_field": text_field, "label_field": label_field,
                              **({"text_pair_field": text_pair_field} if text_pair_field else {})}}
    with _reported_errors(), _client(url, api_key) as client:
        model = client.create_model(request)
        typer.echo(model.id)
        if not wait:
            typer.echo(f"model {model.id} is building; `fastif models` shows when it is ready", err=True)
            return
        with _interrupt_note(f"the build of model {model.id}"), ProgressBar(f"build {name}") as bar:
            model = client.wait_for_model(model.id, timeout=timeout, on_progress=bar)
    typer.echo(f"model {model.id} is ready: {model.num_train} training examples, labels {model.labels}", err=True)


def submit(
    model: Annotated[str, typer.Option("--model", help="the model's id")],
    text: Annotated[Optional[list[str]], typer.Option(help="an input text (repeat for several inputs)")] = None,
    label: Annotated[Optional[list[str]], typer.Option(
        help="the label of each --text input (repeat as often as --text); default: the prediction")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="a local JSON Lines file of inputs: one {\"text\", \"text_pair\"?, \"label\"?} per line")] = None,
    inputs_from: Annotated[Optional[str], typer.Option(
        help="a dataset job: a file in the service's data root (JSONL, CSV, TSV or a saved Hugging Face dataset, read "
             "with the model's training-data fields), up to the service's FASTIF_MAX_DATASET_INPUTS inputs, run in "
             "shards over the workers")] = None,
    kind: Annotated[SubmitKind, typer.Option(case_sensitive=False, help="the job to start")] = SubmitKind.influence,
    k: Annotated[Optional[int], typer.Option(help="kNN candidates per input; 0 scores every training example")] = None,
    top: Annotated[Optional[int], typer.Option(help="helpful and harmful examples per input (self-influence: "
                                                    "keep the first TOP of the ranking)")] = None,
    solver: Annotated[Optional[str], typer.Option(help="ekfac (the service's default), kfac, lissa, cg or identity")] = None,
    sample: Annotated[Optional[int], typer.Option(help="self-influence: a random sample of this many training examples")] = None,
    idempotency_key: Annotated[Optional[str], typer.Option(help="the same key and request give the same job")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the job is done, with a progress bar")] = False,
    timeout: TimeoutOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Start an influence, explain or self-influence job; prints the job's id."""
    with _reported_errors():
        request = _submit_request(kind, model, text or [], label or [], file, k, top, solver, sample, inputs_from)
        with _client(url, api_key) as client:
            job = client.submit(kind.value, request, idempotency_key=idempotency_key)
            typer.echo(job.id)
            if not wait:
                typer.echo(f"job {job.id} is {job.status}; `fastif results {job.id}` once it has succeeded", err=True)
                return
            with _interrupt_note(f"job {job.id} (`fastif cancel {job.id}` stops it)"), \
                    ProgressBar(f"{kind.value} {job.id[:8]}") as bar:
                job = client.wait_for_job(job.id, timeout=timeout, on_progress=bar)
    typer.echo(f"job {job.id} succeeded: {job.result_count} result item(s); `fastif results {job.id}`", err=True)


def _submit_request(kind: SubmitKind, model_id: str, texts: list[str], labels: list[str], file: Path | None,
                    k: int | None, top: int | None, solver: str | None, sample: int | None,
                    inputs_from: str | None = None) -> dict[str, Any]:
    """The request body of `fastif submit`; ValueError for a command line that does not make one."""
    body: dict[str, Any] = {"model_id": model_id}
    if inputs_from is not None:
        if texts or labels or file is not None or sample is not None:
            raise ValueError("--inputs-from names the job's inputs (and their labels): not with --text, --label, --file "
                             "or --sample")
        body["inputs_from"] = {"path": inputs_from}
    if solver is not None:
        body["solver"] = solver
    if top is not None:
        body["top"] = top
    if kind is SubmitKind.self_influence:
        if k is not None:
            raise ValueError("--k is for influence and explain jobs")
        if inputs_from is not None:
            if top is not None:
                raise ValueError("--top ranks training examples: not with --inputs-from, whose items stay in input order")
            return body
        if texts or file is not None:
            raise ValueError("self-influence scores the model's training examples: give --sample or nothing, "
                             "not --text or --file")
        if sample is not None:
            body["sample"] = sample
        return body
    if sample is not None:
        raise ValueError("--sample is for self-influence jobs")
    if inputs_from is None and bool(texts) == (file is not None):
        raise ValueError("give the inputs as --text (repeatable), as --file inputs.jsonl, or as --inputs-from "
                         "(a file in the service's data root), one of the three")
    if labels and len(labels) != len(texts):
        raise ValueError(f"--label given {len(labels)} times for {len(texts)} --text inputs")
    if file is not None:
        body["inputs"] = read_inputs(file)
    elif inputs_from is None:
        body["inputs"] = [{"text": t, **({"label": labels[i]} if labels else {})} for i, t in enumerate(texts)]
    if k is not None:
        body["k"] = None if k == 0 else k
    return body


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """The inputs of a JSON Lines file, one object per non-blank line; ValueError naming the line."""
    with open(path, encoding="utf-8") as lines:
        inputs = [_input_of(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not inputs:
        raise ValueError(f"{path}: no inputs (one JSON object per line)")
    return inputs


def _input_of(line: str, where: str) -> dict[str, Any]:
    """One line of an inputs file as an input (its text, text_pair and label); ValueError naming `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON: {err.msg}") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: expected an object with a \"text\" string")
    return {key: row[key] for key in ("text", "text_pair", "label") if row.get(key) is not None}


def jobs(
    status: Annotated[Optional[str], typer.Option(help="only jobs in this status: queued, running, succeeded, "
                                                       "failed or cancelled")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List recent jobs, newest first."""
    from typing import get_args

    from api_schemas import JobStatus

    with _reported_errors():
        if status is not None and status not in get_args(JobStatus):
            raise ValueError(f"--status must be one of {', '.join(get_args(JobStatus))}, not {status!r}")
        with _client(url, api_key) as client:
            found = client.list_jobs(status=status, limit=limit)  # type: ignore[arg-type]
    rows = []
    for job in found:
        progress = job.progress
        done = f"{progress.done}/{progress.total}" if progress.total is not None else str(progress.done)
        rows.append([job.id, job.kind, job.status, f"{progress.stage or ''} {done}".strip(), _when(job.created_at),
                     job.model_id, job.error.code if job.error else None])
    _print_table(["ID", "KIND", "STATUS", "PROGRESS", "CREATED", "MODEL", "ERROR"], rows)


def results(
    job: Annotated[str, typer.Argument(help="the job's id")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to this file instead of stdout")] = None,
    page_size: Annotated[Optional[int], typer.Option(
        help="page through the results this many at a time instead of one JSON Lines stream")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Every result item of a job, as JSON Lines, in input order (streamed from GET /v1/jobs/{id}/results.jsonl).

    A dataset job that has not succeeded gives the items of its shards finished so far, and says so on stderr.
    """
    with _reported_errors(), _client(url, api_key) as client:
        record = client.get_job(job)
        if record.status != "succeeded" and record.inputs_total is not None:
            typer.echo(f"job {job} is {record.status}: these are the items of its finished shards, "
                       f"{record.result_count or 0} of {record.inputs_total} inputs", err=True)
        items = client.stream_results(job) if page_size is None else client.iter_results(job, page_size=page_size)
        if output is None:
            _write_stdout(items)
            return
        # Written beside the target and renamed at the end: an interrupted download leaves no
        # file that looks complete.
        partial = output.with_name(output.name + ".part")
        count = 0
        try:
            with open(partial, "w", encoding="utf-8") as out:
                for item in items:
                    out.write(json.dumps(item, ensure_ascii=False) + "\n")
                    count += 1
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    typer.echo(f"wrote {count} result item(s) of job {job} to {output}", err=True)


def _write_stdout(items: Iterator[dict[str, Any]]) -> None:
    try:
        for item in items:
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `fastif results JOB | head`: the reader has all it wanted. Point stdout at nothing so
        # that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cancel(
    job: Annotated[str, typer.Argument(help="the job's id")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a job: a queued one now, a running one at its next check."""
    with _reported_errors(), _client(url, api_key) as client:
        cancelled = client.cancel_job(job)
    state = "cancelled" if cancelled.status == "cancelled" else f"{cancelled.status}, asked to stop"
    typer.echo(f"{cancelled.id} {state}")


def register_commands(app: typer.Typer) -> None:
    """Add the client commands to the `fastif` command."""
    for command in (models, register, submit, jobs, results, cancel):
        app.command(command.__name__)(command)
