"""Labelled text examples from JSONL, CSV/TSV or a Hugging Face dataset saved to disk."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DataSpec
from .errors import DataError, LabelError


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


def _format_of(path: Path, spec: DataSpec) -> str:
    if spec.format != "auto":
        return spec.format
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise DataError(f"{path}: cannot tell the format from the extension '{suffix}'; say jsonl, csv, tsv or hf")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _delimited_rows(path: Path, delimiter: str, quoting: str) -> Iterator[tuple[int, Mapping]]:
    # SST-2's TSV holds stray quote characters: quoting "none" reads them as text.
    quote_mode = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quote_mode)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (no header line)")
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}, line {reader.line_num}: more fields than the header names")
                yield reader.line_num, row
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: {err}") from None


def _hf_rows(path: Path) -> Iterator[tuple[int, Mapping]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved Hugging Face dataset needs the 'datasets' package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a bad folder
        raise DataError(f"{path}: not a Hugging Face dataset saved with save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    for number, row in enumerate(loaded, start=1):
        yield number, row


def _rows(path: Path, spec: DataSpec) -> Iterator[tuple[int, Mapping]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    fmt = _format_of(path, spec)
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt in ("csv", "tsv"):
        return _delimited_rows(path, "\t" if fmt == "tsv" else ",", spec.quoting)
    if fmt == "hf":
        return _hf_rows(path)
    raise DataError(f"{path}: unknown format '{fmt}'")


def resolve_label(value: object, label2id: Mapping[str, int], where: str) -> int:
    """A label given as a name (``"positive"``) or an id (``1`` or ``"1"``) -> its id."""
    num_labels = len(label2id)
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < num_labels:
            return value
    elif isinstance(value, str):
        name = value.strip()
        if name in label2id:
            return label2id[name]
        lowered = {k.lower(): v for k, v in label2id.items()}
        if name.lower() in lowered:
            return lowered[name.lower()]
        if name.lstrip("-").isdigit() and 0 <= int(name) < num_labels:
            return int(name)
    known = ", ".join(f"{name} ({idx})" for name, idx in sorted(label2id.items(), key=lambda kv: kv[1]))
    raise LabelError(f"{where}: unknown label {value!r}; the model knows {known}")


def _text(row: Mapping, field: str, where: str, *, required: bool) -> str | None:
    if field not in row:
        raise DataError(f"{where}: missing field '{field}' (fields present: {', '.join(map(str, row.keys()))})")
    value = row[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{where}: field '{field}' is empty")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be text, got {type(value).__name__}")
    return value


def load_examples(spec: DataSpec, label2id: Mapping[str, int]) -> list[Example]:
    """Read every example of ``spec.path``; any bad row raises DataError naming file, line and field."""
    path = Path(spec.path)
    examples: list[Example] = []
    for number, row in _rows(path, spec):
        where = f"{path}, line {number}"
        text = _text(row, spec.text_field, where, required=True)
        pair = _text(row, spec.text_pair_field, where, required=True) if spec.text_pair_field else None
        if spec.label_field not in row:
            raise DataError(f"{where}: missing field '{spec.label_field}' (fields present: {', '.join(map(str, row.keys()))})")
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
