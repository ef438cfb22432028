"""Rows of labelled text from JSONL, CSV/TSV or a saved Hugging Face dataset, with errors that name file, line and field.

Torch-free on purpose: the engine reads training and evaluation files with it
(fastif/data.py), and the API checks a dataset job's input file with the same rules
before it queues anything (service/api/starting.py), so both refuse the same rows
with the same words.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Format = Literal["auto", "jsonl", "csv", "tsv", "hf"]
Quoting = Literal["minimal", "none"]


class DataFileError(ValueError):
    """A file that cannot be read as described; the message names the file, and the line and field where there is one.

    ``line`` and ``field`` say the same for a caller that reports them apart (the API's field errors).
    """

    def __init__(self, message: str, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.line = line
        self.field = field


def format_of(path: Path, fmt: Format = "auto") -> str:
    """The format to read ``path`` as: ``fmt``, or for auto its extension's (a folder is a Hugging Face dataset)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise DataFileError(f"{path}: cannot tell the format from the extension '{suffix}'; say jsonl, csv, tsv or hf")


def _utf8(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataFileError(f"{path}, line {number}: not UTF-8 text", number) from None


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 at its first bad line (a text reader would only say where its buffer broke)."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            _utf8(raw, path, number)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = _utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({err.msg})", number) from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}", number)
            yield number, row


def _delimited_rows(path: Path, delimiter: str, quoting: Quoting) -> Iterator[tuple[int, Mapping]]:
    # SST-2's TSV holds stray quote characters: quoting "none" reads them as text.
    quote_mode = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    _check_utf8(path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quote_mode)
        if not reader.fieldnames:
            raise DataFileError(f"{path}: empty file (no header line)")
        try:
            for row in reader:
                if None in row:
                    raise DataFileError(f"{path}, line {reader.line_num}: more fields than the header names",
                                        reader.line_num)
                yield reader.line_num, row
        except csv.Error as err:
            raise DataFileError(f"{path}, line {reader.line_num}: {err}", reader.line_num) from None


def _hf_rows(path: Path) -> Iterator[tuple[int, Mapping]]:
    try:
        import datasets
    except ImportError:
        raise DataFileError(f"{path}: reading a saved Hugging Face dataset needs the 'datasets' package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a bad folder
        raise DataFileError(f"{path}: not a Hugging Face dataset saved with save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    for number, row in enumerate(loaded, start=1):
        yield number, row


def read_rows(path: Path, fmt: Format = "auto", quoting: Quoting = "minimal") -> Iterator[tuple[int, Mapping]]:
    """(line number, row) for every row of the file; a file that cannot be read raises DataFileError as it is met.

    Bytes that are not UTF-8 are reported at their line, and unreadable files the same way.
    """
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    kind = format_of(path, fmt)
    if kind == "jsonl":
        rows = _jsonl_rows(path)
    elif kind in ("csv", "tsv"):
        rows = _delimited_rows(path, "\t" if kind == "tsv" else ",", quoting)
    elif kind == "hf":
        rows = _hf_rows(path)
    else:
        raise DataFileError(f"{path}: unknown format '{kind}'")
    return _reported(path, rows)


def _reported(path: Path, rows: Iterator[tuple[int, Mapping]]) -> Iterator[tuple[int, Mapping]]:
    """``rows``, with an OS error (a file that cannot be opened or read) turned into a DataFileError."""
    try:
        yield from rows
    except OSError as err:
        raise DataFileError(f"{path}: cannot be read ({err.strerror or err})") from None


def missing_field(row: Mapping, field: str, where: str, line: int | None = None) -> DataFileError:
    return DataFileError(f"{where}: missing field '{field}' (fields present: {', '.join(map(str, row.keys()))})",
                         line, field)


def row_text(row: Mapping, field: str, where: str, *, required: bool, line: int | None = None) -> str | None:
    """The text in ``field`` of ``row``; None for an empty optional one. ``where`` starts every message."""
    if field not in row:
        raise missing_field(row, field, where, line)
    value = row[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataFileError(f"{where}: field '{field}' is empty", line, field)
        return None
    if not isinstance(value, str):
        raise DataFileError(f"{where}: field '{field}' must be text, got {type(value).__name__}", line, field)
    return value


class LabelError(ValueError):
    """A label that names none of the model's labels."""


def resolve_label(value: object, label2id: Mapping[str, int], where: str) -> int:
    """A label given as a name (``"positive"``, any case) or an id (``1`` or ``"1"``) -> its id."""
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


@dataclass(frozen=True)
class InputRow:
    """One test input read from a file; ``label`` None means the model's predicted label."""

    text: str
    text_pair: str | None
    label: int | None


def read_inputs(path: Path, *, text_field: str, text_pair_field: str | None, label_field: str | None,
                labels: Mapping[str, int], label_required: bool = False, label_field_named: bool = False,
                fmt: Format = "auto", quoting: Quoting = "minimal", limit: int | None = None,
                max_rows: int | None = None, max_text_chars: int | None = None) -> list[InputRow]:
    """The test inputs of a file: text, pair text and label of each row, checked as a job checks inline inputs.

    A row without ``label_field`` (or with an empty one, or a negative number: the unknown label
    of GLUE's test splits) uses the predicted label unless ``label_required``; a field the caller
    named (``label_field_named``) that no row has is an error, a typo rather than a choice.
    ``limit`` reads only the first rows; past ``max_rows`` rows raises TooManyRows; a text longer
    than ``max_text_chars`` raises TextTooLong. Every error names the file, the line and the field.
    """
    inputs: list[InputRow] = []
    labelled = False
    for number, row in read_rows(path, fmt, quoting):
        if limit is not None and len(inputs) >= limit:
            break
        if max_rows is not None and len(inputs) >= max_rows:
            raise TooManyRows(f"{path}: more than {max_rows} inputs (line {number} is past the limit)", number)
        where = f"{path}, line {number}"
        text = row_text(row, text_field, where, required=True, line=number)
        pair = row_text(row, text_pair_field, where, required=True, line=number) if text_pair_field else None
        for field, value in ((text_field, text), (text_pair_field, pair)):
            if max_text_chars is not None and value is not None and len(value) > max_text_chars:
                raise TextTooLong(f"{where}: field '{field}' has {len(value)} characters; at most {max_text_chars}",
                                  number, field)
        label = None
        if label_field is not None:
            raw = row.get(label_field)
            labelled = labelled or label_field in row
            unknown = isinstance(raw, int) and not isinstance(raw, bool) and raw < 0
            if raw is None or unknown or (isinstance(raw, str) and not raw.strip()):
                if label_required:
                    raise (missing_field(row, label_field, where, number) if label_field not in row
                           else DataFileError(f"{where}: field '{label_field}' is empty", number, label_field))
            else:
                try:
                    label = resolve_label(raw, labels, f"{where}, field '{label_field}'")
                except LabelError as err:
                    raise UnknownLabel(str(err), number, label_field) from None
        inputs.append(InputRow(text=text, text_pair=pair, label=label))  # type: ignore[arg-type]
    if not inputs:
        raise EmptyFile(f"{path}: no inputs (the file is empty)")
    if label_field_named and not labelled:
        raise DataFileError(f"{path}: no row has the field '{label_field}' named as the label field", None, label_field)
    return inputs


class TooManyRows(DataFileError):
    """More rows than the caller accepts."""


class TextTooLong(DataFileError):
    """A text longer than the caller accepts."""


class UnknownLabel(DataFileError):
    """A label that names none of the model's labels."""


class EmptyFile(DataFileError):
    """A file without a single row."""


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names, sizes and bytes, in name order): what a job pins its
    inputs to."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class FileChanged(DataFileError):
    """The file's bytes are not those its sha256 pins, or changed while it was being read."""


def read_pinned_inputs(path: Path, sha256: str | None = None, **reading) -> tuple[list[InputRow], str]:
    """``read_inputs(path, **reading)`` and the file's sha256, refused (FileChanged) when the bytes differ from
    ``sha256`` or change while they are read: the rows returned are those of the bytes the hash names."""
    before = content_sha256(path)
    if sha256 is not None and before != sha256:
        raise FileChanged(f"{path}: its sha256 is {before}, not the {sha256} pinned")
    inputs = read_inputs(path, **reading)
    if content_sha256(path) != before:
        raise FileChanged(f"{path}: changed while it was being read")
    return inputs, before
