"""Data files a job names (pools, evaluation and anchor sets, held-out inputs), read like the model's training data."""

from __future__ import annotations

from pathlib import Path

from api_schemas import DataRef, Model
from fastif import Example, InfluenceEngine, load_examples
from records.paths import OutsideRoot, resolve_inside

from .configs import data_file_spec
from .runner import JobFailed, JobRun


def resolve(run: JobRun, relative: str) -> Path:
    """A path of the request, relative to the data root; refuse anything that escapes it."""
    try:
        return resolve_inside(run.ctx.settings.data_root, relative)
    except OutsideRoot:
        raise JobFailed("path-outside-data-root", f"{relative!r} is not inside the data root") from None


def load(run: JobRun, engine: InfluenceEngine, model: Model, ref: DataRef) -> list[Example]:
    """Examples of a data file, read with the model's training-data fields unless the request says otherwise."""
    examples = load_examples(data_file_spec(resolve(run, ref.path), ref, model.request.train_data),
                             engine.classifier.label2id)
    return examples[: ref.limit] if ref.limit else examples
