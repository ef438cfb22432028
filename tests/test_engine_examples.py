"""The training set held compactly (fastif/data.py ``Examples``): every example reads back as it was given."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastif import DataSpec, Example
from fastif.data import Examples, TextColumn, load_examples, texts_of

EXAMPLES = [Example("plain", None, 0), Example("ünïcode ✓ and 中文", "a second text", 1), Example("", "", 0),
            Example("tab\tand\nnew line", None, 1)]


def test_examples_read_back_one_by_one_in_slices_and_from_the_end():
    held = Examples.of(EXAMPLES)
    expected = [Example(e.text, e.text_pair or None, e.label) for e in EXAMPLES]  # no second text reads as None
    assert len(held) == 4 and list(held) == expected
    assert held[1:3] == expected[1:3] and held[-1] == expected[-1] and held[::-2] == expected[::-2]
    with pytest.raises(IndexError):
        held[4]
    texts, pairs = texts_of(held)
    assert texts[:] == [e.text for e in EXAMPLES] and pairs[:] == [e.text_pair or "" for e in EXAMPLES]
    assert texts_of(held[:1])[1] is None and Examples.of(EXAMPLES[:1]).pairs is None  # no example has one
    assert held.labels.dtype == np.int64 and held.labels.tolist() == [0, 1, 0, 1]
    assert Examples.of(held) is held


def test_a_text_column_is_one_buffer_and_offsets():
    column = TextColumn.of(["ab", "", "é"])
    assert column.data == "abé".encode() and column.offsets.tolist() == [0, 2, 2, 4]
    assert [column[i] for i in range(3)] == ["ab", "", "é"] and column[-3] == "ab"


def test_a_file_loads_as_the_examples_a_naive_reading_gives(tmp_path):
    rows = [{"text": f"sentence {i} ✓", "pair": f"hypothesis {i}", "label": ["negative", "positive"][i % 2]}
            for i in range(50)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    label2id = {"negative": 0, "positive": 1}
    loaded = load_examples(DataSpec(str(path), text_pair_field="pair"), label2id)
    assert list(loaded) == [Example(r["text"], r["pair"], label2id[r["label"]]) for r in rows]
    single = load_examples(DataSpec(str(path)), label2id)
    assert single.pairs is None and [e.text for e in single] == [r["text"] for r in rows]
