"""The training set is read and tokenised once and then mapped from its files (fastif/stored_set.py).

Every process that loads a model (each worker, each shard of a build) used to read and tokenise
the whole set into its own memory; now the first one stores it and the others map it.
"""

from __future__ import annotations

import gc
import json
import os
import time
import tracemalloc

import numpy as np
import pytest

from fastif import DataSpec, Example, InfluenceEngine, InfluenceSpec
from fastif import engine as engine_module
from fastif.data import Examples, load_examples, texts_of
from fastif.encoding import tokenize
from fastif.modeling import load_classifier
from fastif.staged_build import STALE_BUILD_S
from fastif.stored_set import SETS_FOLDER, open_set, save_set
from tiny import make_tiny_family, sentences, write_jsonl

EXAMPLES = [Example("plain", None, 0), Example("ünïcode ✓ and 中文", "a second text", 1), Example("", "", 0),
            Example("tab\tand\nnew line", "b", 1)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("stored-set-model") / "model", "bert", seed=3)


def tokenized(model_dir, examples: Examples, max_length: int = 16):
    texts, pairs = texts_of(examples)
    return tokenize(load_classifier(model_dir, "cpu").tokenizer, texts, pairs, examples.labels, max_length)


def test_a_stored_set_reads_back_as_it_was_given_from_read_only_maps(model_dir, tmp_path):
    examples = Examples.of(EXAMPLES)
    tokens = tokenized(model_dir, examples)
    save_set(tmp_path / "set", examples, tokens)
    stored = open_set(tmp_path / "set")
    assert list(stored.examples) == list(examples)
    assert stored.examples.labels.tolist() == [0, 1, 0, 1] and stored.tokens.labels.tolist() == [0, 1, 0, 1]
    for mine, theirs in [(stored.tokens.input_ids, tokens.input_ids), (stored.tokens.token_type_ids, tokens.token_type_ids)]:
        assert isinstance(mine.flat, np.memmap) and not mine.flat.flags.writeable
        assert [mine[i].tolist() for i in range(4)] == [theirs[i].tolist() for i in range(4)]
    assert isinstance(stored.examples.texts.data, np.memmap) and not stored.examples.texts.data.flags.writeable
    assert stored.bytes_on_disk() == sum(p.stat().st_size for p in (tmp_path / "set").iterdir())
    single = Examples.of(EXAMPLES[:1])
    save_set(tmp_path / "single", single, tokenized(model_dir, single))
    assert open_set(tmp_path / "single").examples.pairs is None and open_set(tmp_path / "single").tokens.token_type_ids is None


def test_only_a_whole_set_of_this_version_opens_and_a_second_writer_keeps_the_first(model_dir, tmp_path):
    examples = Examples.of(EXAMPLES)
    tokens = tokenized(model_dir, examples)
    assert open_set(tmp_path / "set") is None
    for name, age_s in [(".writing-dead", 2 * STALE_BUILD_S), (".writing-live", 60)]:  # a writer died; one writes now
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (time.time() - age_s, time.time() - age_s))
    save_set(tmp_path / "set", examples, tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".writing-live", "set"]
    (tmp_path / ".writing-live").rmdir()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set").iterdir()}
    save_set(tmp_path / "set", examples, tokens)  # another process writing the same set meanwhile
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no scratch folder left
    meta = tmp_path / "set" / "meta.json"
    meta.write_text(json.dumps({"version": 0}))
    assert open_set(tmp_path / "set") is None  # written by another version: read and tokenised again
    meta.unlink()
    assert open_set(tmp_path / "set") is None
    with pytest.raises(ValueError, match="tokenised"):
        save_set(tmp_path / "other", examples, tokenized(model_dir, Examples.of(EXAMPLES[:2])))


def test_engines_over_one_data_file_tokenise_it_once_and_give_the_same_answers(model_dir, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", sentences(30, seed=4))
    spec = DataSpec(str(train))
    first = InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), artefact_dir=tmp_path / "artefacts", device="cpu")
    in_memory = InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), device="cpu")
    assert list(first.train) == list(load_examples(spec, first.classifier.label2id)) == list(in_memory.train)
    assert isinstance(first.train.texts.data, np.memmap)

    def refuse(*_args, **_kwargs):
        raise AssertionError("the stored set was tokenised again")

    monkeypatch.setattr(engine_module, "tokenize", refuse)
    monkeypatch.setattr(engine_module, "load_examples", refuse)
    hashed = []
    digest = engine_module.model_files_digest
    monkeypatch.setattr(engine_module, "model_files_digest", lambda path: hashed.append(path) or digest(path))
    second = InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(params=("classifier",)),
                                        artefact_dir=tmp_path / "artefacts", device="cpu")
    assert len(hashed) == 1  # the model's files are read once for the set's key and the fingerprint
    assert second.fingerprint != first.fingerprint and list(second.train) == list(first.train)
    assert first.fingerprint == in_memory.fingerprint  # where the set comes from changes no artefact
    first.prepare()
    in_memory.prepare()
    assert np.array_equal(first.features, in_memory.features) and np.array_equal(first.gradient_keys, in_memory.gradient_keys)
    sets = list((tmp_path / "artefacts" / SETS_FOLDER).iterdir())
    assert len(sets) == 1 and first.bytes_on_disk() == first.store.bytes_on_disk() + open_set(sets[0]).bytes_on_disk()
    monkeypatch.undo()
    # Another file, or another max_length, is another set.
    write_jsonl(train, sentences(31, seed=4))
    InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), artefact_dir=tmp_path / "artefacts", device="cpu")
    InfluenceEngine.from_paths(model_dir, DataSpec(str(tmp_path / "train.jsonl")), InfluenceSpec(max_length=8),
                               artefact_dir=tmp_path / "artefacts", device="cpu")
    assert len(list((tmp_path / "artefacts" / SETS_FOLDER).iterdir())) == 3


def test_what_an_engine_over_a_stored_set_holds_does_not_grow_with_the_set(tmp_path):
    """Texts and token ids are mapped from files: the engine's own allocations over them are the labels (8 bytes an
    example), where holding the set took its texts, ids and offsets too."""
    model_dir = make_tiny_family(tmp_path / "model", "bert", seed=3, hidden=64, intermediate=64)
    held, whole = {}, {}
    for count in (200, 6400):
        train = write_jsonl(tmp_path / f"train-{count}.jsonl", sentences(count, seed=7))
        spec = DataSpec(str(train))
        InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), artefact_dir=tmp_path / "artefacts", device="cpu")
        held[count] = min(_held_by_a_new_engine(model_dir, spec, tmp_path / "artefacts") for _ in range(2))
        in_memory = InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), device="cpu")
        whole[count] = sum(a.nbytes for a in (in_memory.train.labels, in_memory.train.texts.offsets,
                                               in_memory.tokens.input_ids.flat, in_memory.tokens.input_ids.offsets)) \
            + len(in_memory.train.texts.data)
    growth, whole_growth = held[6400] - held[200], whole[6400] - whole[200]
    assert growth < 0.3 * whole_growth, (held, whole)


def _held_by_a_new_engine(model_dir, spec: DataSpec, artefacts) -> int:
    """Bytes allocated (by Python and numpy) and still held once an engine over the stored set is constructed."""
    gc.collect()
    tracemalloc.start()
    engine = InfluenceEngine.from_paths(model_dir, spec, InfluenceSpec(), artefact_dir=artefacts, device="cpu")
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del engine
    return held


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_tokenize_gives_what_the_tokenizer_itself_gives(family, tmp_path):
    """The build encodes chunks with the fast tokenizer's Rust side directly (fastif/encoding.py ``_encode``): the
    same ids and segments as the tokenizer's own call, for single texts and pairs, truncated or not; none where the
    model takes none (DistilBERT)."""
    tokenizer = load_classifier(make_tiny_family(tmp_path / family, family), device="cpu").tokenizer
    assert tokenizer.is_fast
    rows = sentences(50, seed=4, noise=0.2)
    texts, seconds = [r["text"] for r in rows], [r["text"] + " and then some more words" for r in reversed(rows)]
    for pairs in (None, seconds):
        for max_length in (6, 64):
            tokens = tokenize(tokenizer, texts, pairs, [0] * len(texts), max_length)  # first: the tokenizer as it was
            expected = tokenizer(texts, pairs, truncation=True, max_length=max_length)
            assert [list(tokens.input_ids[i]) for i in range(len(texts))] == expected["input_ids"]
            if "token_type_ids" not in expected:
                assert tokens.token_type_ids is None
            elif pairs is None:  # all zero: none kept
                assert tokens.token_type_ids is None and not any(map(any, expected["token_type_ids"]))
            else:
                assert [list(tokens.token_type_ids[i]) for i in range(len(texts))] == expected["token_type_ids"]
