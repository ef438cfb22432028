"""Labelled text examples from JSONL, CSV/TSV or a Hugging Face dataset saved to disk (read by datafiles)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import numpy as np

import datafiles

from .config import DataSpec
from .errors import DataError, LabelError

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


class _Rows(Sequence[T]):
    """A sequence read row by row (``_row``): a slice gives a list, a negative index counts from the end."""

    def _row(self, row: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, row: int) -> T: ...

    @overload
    def __getitem__(self, rows: slice) -> list[T]: ...

    def __getitem__(self, row: int | slice) -> T | list[T]:
        if isinstance(row, slice):
            return [self._row(i) for i in range(*row.indices(len(self)))]
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        return self._row(row % len(self))


class TextColumn(_Rows[str]):
    """Texts stored as one UTF-8 buffer and row offsets: text i is ``data[offsets[i]:offsets[i + 1]]``, decoded.

    A ``str`` object per text costs about 50 bytes besides its characters (and a list 8 more): at the
    paper's 400K examples that is tens of MB. A slice gives a list of ``str`` (what a tokenizer call takes).
    """

    def __init__(self, data: bytes | np.ndarray, offsets: np.ndarray):
        self.data = data  # bytes, or uint8 (a memory map of a stored set: fastif/stored_set.py)
        self.offsets = offsets  # int64 [rows + 1]

    @classmethod
    def of(cls, texts: Iterable[str]) -> TextColumn:
        column = _TextColumnBuilder()
        for text in texts:
            column.append(text)
        return column.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _row(self, row: int) -> str:
        return bytes(self.data[self.offsets[row] : self.offsets[row + 1]]).decode("utf-8")


class _TextColumnBuilder:
    def __init__(self) -> None:
        self.buffer, self.ends = bytearray(), [0]

    def append(self, text: str) -> None:
        self.buffer += text.encode("utf-8")
        self.ends.append(len(self.buffer))

    def build(self) -> TextColumn:
        return TextColumn(bytes(self.buffer), np.asarray(self.ends, dtype=np.int64))


class Examples(_Rows[Example]):
    """Labelled examples held compactly (a ``TextColumn`` per text field, labels in one array), read as ``Example``s.

    An engine keeps its whole training set for the texts its answers show: as ``Example`` objects that cost
    several hundred bytes each on top of the text, which at 500K examples was most of a worker's memory
    growth with N.
    """

    def __init__(self, texts: TextColumn, pairs: TextColumn | None, labels: np.ndarray):
        if not len(texts) == len(labels) == (len(pairs) if pairs is not None else len(texts)):
            raise ValueError("texts, pairs and labels differ in length")
        self.texts = texts
        self.pairs = pairs  # None when no example has a second text
        self.labels = labels  # int64 [N]

    @classmethod
    def of(cls, examples: Iterable[Example]) -> Examples:
        if isinstance(examples, Examples):
            return examples
        examples = examples if isinstance(examples, Sequence) else list(examples)
        paired = any(ex.text_pair for ex in examples)
        return cls(TextColumn.of(ex.text for ex in examples),
                   TextColumn.of(ex.text_pair or "" for ex in examples) if paired else None,
                   np.fromiter((ex.label for ex in examples), dtype=np.int64, count=len(examples)))

    def __len__(self) -> int:
        return len(self.labels)

    def _row(self, row: int) -> Example:
        return Example(self.texts[row], self.pairs[row] or None if self.pairs is not None else None, int(self.labels[row]))


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


def load_examples(spec: DataSpec, label2id: Mapping[str, int]) -> Examples:
    """Read every example of ``spec.path``; any bad row raises DataError naming file, line and field."""
    path = Path(spec.path)
    texts, pairs, labels = _TextColumnBuilder(), _TextColumnBuilder() if spec.text_pair_field else None, []
    for number, row in _rows(path, spec):
        where = f"{path}, line {number}"
        texts.append(_text(row, spec.text_field, where, required=True))
        if pairs is not None:
            pairs.append(_text(row, spec.text_pair_field, where, required=True))
        if spec.label_field not in row:
            raise DataError(str(datafiles.missing_field(row, spec.label_field, where)))
        try:
            labels.append(resolve_label(row[spec.label_field], label2id, f"{where}, field '{spec.label_field}'"))
        except LabelError as err:
            raise DataError(str(err)) from None
    if not labels:
        raise DataError(f"{path}: no examples (the file is empty)")
    second = pairs.build() if pairs is not None else None
    # A second-text field empty in every row tokenizes as no second text, as for examples given in memory.
    return Examples(texts.build(), second if second is not None and second.data else None,
                    np.asarray(labels, dtype=np.int64))


def texts_of(examples: Sequence[Example]) -> tuple[Sequence[str], Sequence[str] | None]:
    """The examples' texts and second texts ("" where one has none; None when none has one), for the tokenizer."""
    if isinstance(examples, Examples):
        return examples.texts, examples.pairs
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair or "" for ex in examples] if any(ex.text_pair for ex in examples) else None
    return texts, pairs
