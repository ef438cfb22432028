"""Labelled text examples from JSONL, CSV/TSV or a Hugging Face dataset saved to disk (read by datafiles)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datafiles

from .config import DataSpec
from .errors import DataError, LabelError


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


def _rows(path: Path, spec: DataSpec) -> Iterator[tuple[int, Mapping]]:
    """Every (line, row) of the file; a file that cannot be read raises DataError naming file and line."""
    try:
        yield from datafiles.read_rows(path, spec.format, spec.quoting)
    except datafiles.DataFileError as err:
        raise DataError(str(err)) from None


def resolve_label(value: object, label2id: Mapping[str, int], where: str) -> int:
    """A label given as a name (``"positive"``) or an id (``1`` or ``"1"``) -> its id (datafiles.resolve_label)."""
    try:
        return datafiles.resolve_label(value, label2id, where)
    except datafiles.LabelError as err:
        raise LabelError(str(err)) from None


def _text(row: Mapping, field: str, where: str, *, required: bool) -> str | None:
    try:
        return datafiles.row_text(row, field, where, required=required)
    except datafiles.DataFileError as err:
        raise DataError(str(err)) from None


def load_examples(spec: DataSpec, label2id: Mapping[str, int]) -> list[Example]:
    """Read every example of ``spec.path``; any bad row raises DataError naming file, line and field."""
    path = Path(spec.path)
    examples: list[Example] = []
    for number, row in _rows(path, spec):
        where = f"{path}, line {number}"
        text = _text(row, spec.text_field, where, required=True)
        pair = _text(row, spec.text_pair_field, where, required=True) if spec.text_pair_field else None
        if spec.label_field not in row:
            raise DataError(str(datafiles.missing_field(row, spec.label_field, where)))
        try:
            label = resolve_label(row[spec.label_field], label2id, f"{where}, field '{spec.label_field}'")
        except LabelError as err:
            raise DataError(str(err)) from None
        examples.append(Example(text=text, text_pair=pair, label=label))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def texts_of(examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair or "" for ex in examples] if any(ex.text_pair for ex in examples) else None
    return texts, pairs
