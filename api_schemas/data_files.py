"""Data files a request names inside the data root: how to read one, and a dataset job's input file."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import Field

from .common import PathStr, RequestModel
from .models import Model, TrainData

Count = Annotated[int, Field(strict=True, ge=1)]


class DataFileFields(RequestModel):
    """A data file inside the data root and how to read it; a field left out is the model's training data's."""

    path: PathStr | None = None
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] | None = None
    quoting: Literal["minimal", "none"] | None = None
    # Read at most this many rows (the first ones).
    limit: Count | None = None

    def fields_over(self, train: TrainData) -> ReadFields:
        """How to read the file: this request's fields, else the training data's (a pair field goes only with a
        text field of the request's own, so that naming a text field alone reads single texts)."""
        return ReadFields(text_field=self.text_field or train.text_field,
                          text_pair_field=self.text_pair_field if self.text_field else train.text_pair_field,
                          label_field=self.label_field or train.label_field, format=self.format or "auto",
                          quoting=self.quoting or train.quoting)


class ReadFields(NamedTuple):
    """Which fields of a data file hold the text, the pair text and the label, and its format."""

    text_field: str
    text_pair_field: str | None
    label_field: str
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"]
    quoting: Literal["minimal", "none"]


class InputsFile(DataFileFields):
    """`inputs_from`: a dataset job's test inputs, one per row of a file in the data root (in place of `inputs`).

    Read with the model's training-data fields unless the request names its own. A row whose label
    field is missing or empty is taken with the model's predicted label, as an inline input with
    `label` null. The API reads the whole file before it queues the job and refuses a bad row by
    file, line and field; the job then reads the same bytes (`sha256`, filled in by the API), or fails.
    """

    path: PathStr
    shard_inputs: Annotated[int, Field(strict=True, ge=1, le=1024)] = Field(
        128, description="the job runs as tasks of this many inputs, which every worker takes from the queue; each "
                         "task's results are readable as soon as it finishes, and one whose worker died is done again "
                         "(a task solves 32 inputs at a time, whatever its size)")
    def reading(self, model: Model, *, max_rows: int, max_text_chars: int) -> dict[str, Any]:
        """The keyword arguments of ``datafiles.read_inputs`` for this file: how the API and the job both read it (the
        request's fields, else the model's training data's; the model's labels; the service's limits)."""
        fields = self.fields_over(model.request.train_data)
        return {"text_field": fields.text_field, "text_pair_field": fields.text_pair_field,
                "label_field": fields.label_field, "label_field_named": self.label_field is not None,
                "labels": {name: i for i, name in enumerate(model.labels or [])}, "fmt": fields.format,
                "quoting": fields.quoting, "limit": self.limit, "max_rows": max_rows, "max_text_chars": max_text_chars}

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="the file's sha256 (a folder's: its files' names and bytes); filled in by the API when "
                          "left out, refused when given and the file differs. The job fails if the file changes "
                          "before it is read")
