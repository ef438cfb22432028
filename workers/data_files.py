"""Data files a job names (pools, evaluation and anchor sets, held-out inputs), read like the model's training data."""

from __future__ import annotations

from pathlib import Path

from api_schemas import DataRef, Model
from fastif import DataSpec, Example, InfluenceEngine, load_examples
from records.paths import OutsideRoot, resolve_inside

from .runner import JobFailed, JobRun


def resolve(run: JobRun, relative: str) -> Path:
    """A path of the request, relative to the data root; refuse anything that escapes it."""
    try:
        return resolve_inside(run.ctx.settings.data_root, relative)
    except OutsideRoot:
        raise JobFailed("path-outside-data-root", f"{relative!r} is not inside the data root") from None


def load(run: JobRun, engine: InfluenceEngine, model: Model, ref: DataRef) -> list[Example]:
    """Examples of a data file, read with the model's training-data fields unless the request says otherwise."""
    train = model.request.train_data
    spec = DataSpec(
        path=str(resolve(run, ref.path)),
        text_field=ref.text_field or train.text_field,
        text_pair_field=ref.text_pair_field if ref.text_field else train.text_pair_field,
        label_field=ref.label_field or train.label_field,
        format=ref.format or "auto",
        quoting=ref.quoting or train.quoting,
    )
    examples = load_examples(spec, engine.classifier.label2id)
    return examples[: ref.limit] if ref.limit else examples
