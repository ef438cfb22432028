"""Every bad input gets its own clear error: which file, which line, which field, which label, which knob."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from fastif import (CGConfig, DataError, DataSpec, FastIFError, InfluenceEngine, InfluenceSpec, LabelError, LissaConfig,
                    ModelLoadError, Query, load_classifier, load_examples)
from tiny import LABELS, make_tiny_family, sentences, write_jsonl

LABEL2ID = {name: i for i, name in enumerate(LABELS)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(path, **spec):
    return load_examples(DataSpec(str(path), **spec), LABEL2ID)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# -- data files ---------------------------------------------------------------------------
def test_good_jsonl_reads_names_and_ids(tmp_path):
    path = write(tmp_path / "ok.jsonl", '{"text": "good film", "label": "positive"}\n\n'
                                        '{"text": "bad film", "label": 0}\n{"text": "fine", "label": "1"}\n')
    examples = load(path)
    assert [(e.text, e.label) for e in examples] == [("good film", 1), ("bad film", 0), ("fine", 1)]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as info:
        load(tmp_path / "absent.jsonl")
    assert "absent.jsonl" in str(info.value)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "no examples"),
    ("blank.jsonl", "\n  \n\n", "no examples"),
    ("empty.csv", "", "empty file"),
    ("header-only.csv", "text,label\n", "no examples"),
])
def test_empty_files(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as info:
        load(path)
    assert name in str(info.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "oops", label: 1}\n')
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "list.jsonl", '{"text": "good", "label": 1}\n["good", 1]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load(path)


def test_missing_field_names_field_and_line(tmp_path):
    path = write(tmp_path / "fields.jsonl", '{"text": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: missing field 'text'") as info:
        load(path)
    assert "sentence" in str(info.value)  # says which fields there are
    path = write(tmp_path / "nolabel.jsonl", '{"text": "good", "label": 1}\n{"text": "good"}\n')
    with pytest.raises(DataError, match=r"line 2: missing field 'label'"):
        load(path)
    path = write(tmp_path / "nopair.jsonl", '{"premise": "a", "hypothesis": "b", "label": 1}\n{"premise": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"line 2: missing field 'hypothesis'"):
        load(path, text_field="premise", text_pair_field="hypothesis")


def test_unknown_label_names_label_and_line(tmp_path):
    path = write(tmp_path / "labels.jsonl", '{"text": "good", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "line 2" in message and "'neutral'" in message and "negative (0), positive (1)" in message
    path = write(tmp_path / "ids.jsonl", '{"text": "good", "label": 2}\n')
    with pytest.raises(DataError, match=r"line 1.*unknown label 2\b"):
        load(path)


def test_non_text_and_empty_text_fields(tmp_path):
    path = write(tmp_path / "number.jsonl", '{"text": "good", "label": 1}\n{"text": 42, "label": 1}\n')
    with pytest.raises(DataError, match=r"line 2: field 'text' must be text, got int"):
        load(path)
    path = write(tmp_path / "blank.jsonl", '{"text": "   ", "label": 1}\n')
    with pytest.raises(DataError, match=r"line 1: field 'text' is empty"):
        load(path)


def test_tsv_with_stray_quotes_reads_as_text_with_quoting_none(tmp_path):
    # SST-2's train.tsv has sentences that start with a quote and never close it.
    lines = ["sentence\tlabel", '" quirky and fun\t1', "a dull film\t0", 'it \'s "really" good\t1', '"\t0', "the end\t1"]
    path = write(tmp_path / "sst.tsv", "\n".join(lines) + "\n")
    examples = load(path, text_field="sentence", quoting="none")
    assert [(e.text, e.label) for e in examples] == [('" quirky and fun', 1), ("a dull film", 0), ('it \'s "really" good', 1),
                                                     ('"', 0), ("the end", 1)]
    # the test data really needs it: with minimal quoting the stray quote swallows the following lines
    try:
        minimal = load(path, text_field="sentence")
    except DataError:
        return
    assert [e.text for e in minimal] != [e.text for e in examples]


def test_csv_with_more_fields_than_header(tmp_path):
    path = write(tmp_path / "wide.csv", "text,label\ngood film,positive\nbad,film,negative\n")
    with pytest.raises(DataError, match=r"wide.csv, line 3: more fields than the header names"):
        load(path)


def test_quoted_csv_reads_commas_inside_quotes(tmp_path):
    path = write(tmp_path / "quoted.csv", 'text,label\n"good, really good",positive\n')
    assert [(e.text, e.label) for e in load(path)] == [("good, really good", 1)]


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "data.txt", "good\t1\n")
    with pytest.raises(DataError, match=r"extension '.txt'"):
        load(path)


def test_every_data_error_is_a_fastif_error_with_a_code(tmp_path):
    with pytest.raises(FastIFError) as info:
        load(tmp_path / "absent.jsonl")
    assert info.value.code == "invalid-data"


# -- models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("model") / "model", "bert", initializer_range=0.3)


def test_model_dir_without_config(tmp_path, model_dir):
    broken = shutil.copytree(model_dir, tmp_path / "noconfig")
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_classifier(broken, "cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_classifier(tmp_path / "absent", "cpu")


def test_model_dir_without_safetensors(tmp_path, model_dir):
    broken = shutil.copytree(model_dir, tmp_path / "nosafetensors")
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"a pickle would run code")
    with pytest.raises(ModelLoadError, match="safetensors") as info:
        load_classifier(broken, "cpu")
    assert info.value.code == "invalid-model"


def test_model_dir_with_unreadable_config(tmp_path, model_dir):
    broken = shutil.copytree(model_dir, tmp_path / "badconfig")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_classifier(broken, "cpu")


def test_engine_from_paths_reports_data_errors(tmp_path, model_dir):
    with pytest.raises(DataError, match="no such file"):
        InfluenceEngine.from_paths(model_dir, DataSpec(str(tmp_path / "absent.jsonl")), device="cpu")
    path = write(tmp_path / "labels.jsonl", '{"text": "good", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"line 2.*'neutral'"):
        InfluenceEngine.from_paths(model_dir, DataSpec(str(path)), device="cpu")


# -- queries ----------------------------------------------------------------------------------
def test_unknown_label_in_a_query(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", sentences(10))
    engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(), device="cpu")
    with pytest.raises(LabelError, match=r"input 1: unknown label 'neutral'.*negative \(0\), positive \(1\)"):
        engine.encode([Query("good film"), Query("meh", label="neutral")])
    with pytest.raises(LabelError, match=r"input 0: unknown label 5"):
        engine.analyze([Query("good film", label=5)], k=3, solver=LissaConfig(depth=2))
    # names, ids and id strings are all accepted
    assert engine.encode([Query("a", label="positive"), Query("b", label=0), Query("c", label="1"),
                          Query("d", label="NEGATIVE")]).labels_used == [1, 0, 1, 0]


def test_query_before_prepare_says_so(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", sentences(10))
    engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(), device="cpu")
    with pytest.raises(RuntimeError, match="prepare"):
        engine.candidates(engine.encode([Query("good")]).search(0), 3)


# -- solver settings ------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"damp": 0.0}, "damp"), ({"damp": 1.0}, "damp"), ({"damp": -0.1}, "damp"), ({"damp": math.nan}, "damp"),
    ({"scale": 0.0}, "scale"), ({"scale": -5.0}, "scale"), ({"scale": math.nan}, "scale"), ({"scale": math.inf}, "scale"),
    ({"depth": 0}, "depth"), ({"batch_size": 0}, "batch_size"), ({"repeats": 0}, "repeats"),
])
def test_invalid_lissa_config(values, message):
    with pytest.raises(ValueError, match=message):
        LissaConfig(**values)


def test_valid_lissa_config_and_its_damping():
    config = LissaConfig(damp=0.01, scale=100.0, depth=5, batch_size=2, repeats=3, seed=9)
    assert config.damping == pytest.approx(1.0)
    assert json.loads(json.dumps(config.__dict__)) == config.__dict__  # plain JSON values (cache keys)


def test_invalid_cg_config():
    with pytest.raises(ValueError, match="damping"):
        CGConfig(damping=-1.0)
