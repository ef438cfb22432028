"""The benchmark's data: SST-2 sentences packed into fixed-length inputs, and toy data for ``--quick``.

DESIGN §4's costs are for 66-token inputs, and SST-2 sentences are short (about
10 words), so every benchmark example is made by concatenating shuffled SST-2
sentences *of the same label* until the text holds at least ``tokens`` tokens;
the engine and the reference then truncate it to exactly ``tokens`` tokens
(``max_length``). Test inputs are packed the same way from the dev split when a
``dev.tsv`` sits beside the training file, else from held-out training sentences.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from fastif.config import DataSpec

LABELS = ["negative", "positive"]


@dataclass(frozen=True)
class Row:
    text: str
    label: int  # 0 negative, 1 positive


def _label_id(value: object, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("0", "negative", "neg"):
        return 0
    if text in ("1", "positive", "pos"):
        return 1
    raise ValueError(f"{where}: label {value!r} is not binary sentiment (0/1 or negative/positive)")


def read_rows(path: Path) -> list[Row]:
    """Binary sentiment rows from a TSV/CSV (SST-2: header ``sentence\\tlabel``, no quoting) or JSONL file."""
    rows: list[Row] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                item = json.loads(line)
                text = item.get("sentence", item.get("text"))
                rows.append(Row(str(text).strip(), _label_id(item["label"], f"{path}:{number}")))
        return rows
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        field = "sentence" if "sentence" in (reader.fieldnames or []) else "text"
        for row in reader:
            text = (row.get(field) or "").strip()
            if text:
                rows.append(Row(text, _label_id(row["label"], f"{path}:{reader.line_num}")))
    if not rows:
        raise ValueError(f"{path}: no rows with a 'sentence' (or 'text') and a 'label' field")
    return rows


def pack(rows: list[Row], tokenizer, tokens: int, count: int | None, seed: int) -> list[Row]:
    """Same-label concatenations of shuffled sentences, each at least ``tokens`` tokens long (with [CLS]/[SEP])."""
    rng = random.Random(seed)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    lengths = [len(ids) for ids in tokenizer([r.text for r in shuffled], add_special_tokens=False)["input_ids"]]
    packed: list[Row] = []
    open_parts: dict[int, list[str]] = {0: [], 1: []}
    open_len = {0: 2, 1: 2}  # [CLS] and [SEP]
    for row, length in zip(shuffled, lengths):
        open_parts[row.label].append(row.text)
        open_len[row.label] += length
        if open_len[row.label] >= tokens:
            packed.append(Row(" ".join(open_parts[row.label]), row.label))
            open_parts[row.label], open_len[row.label] = [], 2
            if count is not None and len(packed) >= count:
                break
    return packed


def write_tsv(path: Path, rows: list[Row]) -> Path:
    """SST-2's layout: ``sentence\\tlabel`` with no quoting (texts hold no tabs or newlines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        for row in rows:
            handle.write(f"{row.text.replace(chr(9), ' ').replace(chr(10), ' ')}\t{row.label}\n")
    return path


def tsv_spec(path: Path) -> DataSpec:
    return DataSpec(path=str(path), text_field="sentence", label_field="label", quoting="none")


# -- toy data for --quick -------------------------------------------------------------------------
POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "fun", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "cold"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "very", "quite", "story", "and", "but", "a", "it"]
TOY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def toy_rows(count: int, seed: int, words: int = 10, noise: float = 0.1) -> list[Row]:
    """Short reviews whose label is set by their sentiment words; ``noise`` flips a fraction of labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        sentiment = [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(rng.randint(1, 3))]
        filler = [rng.choice(FILLER) for _ in range(words - len(sentiment))]
        text = filler + sentiment
        rng.shuffle(text)
        if rng.random() < noise:
            label = 1 - label
        rows.append(Row(" ".join(text), label))
    return rows
