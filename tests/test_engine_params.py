"""Which parameters influence is computed over, per encoder family, and the engine on each family.

The expected ``auto`` selections are written out per family from the model's own module
paths (last block + whatever runs after the encoder), independently of fastif.params.
"""

from __future__ import annotations

import pytest
import torch

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, ParamSelectionError
from fastif.params import count, find_layer_stack, first_influence_layer, key_biases, select_influence_params
from tiny import FAMILIES, Reference, assert_close, make_tiny_family, sentences, tiny_family_model, write_jsonl

LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def auto_modules(family: str, model) -> list[torch.nn.Module]:
    """FastIF's fine-tuned top, by hand: the last block and the modules after the encoder."""
    if family == "bert":
        return [model.bert.encoder.layer[-1], model.bert.pooler, model.classifier]
    if family == "roberta":
        assert model.roberta.pooler is None  # no pooling layer for sequence classification
        return [model.roberta.encoder.layer[-1], model.classifier]
    if family == "distilbert":
        return [model.distilbert.transformer.layer[-1], model.pre_classifier, model.classifier]
    if family == "deberta-v2":
        return [model.deberta.encoder.layer[-1], model.pooler, model.classifier]
    if family == "electra":
        return [model.electra.encoder.layer[-1], model.classifier]
    raise ValueError(family)


def ids_of(modules, model) -> set[int]:
    """The parameters of ``modules`` except attention's key biases, which no selection holds."""
    ignored = {id(p) for n, p in model.named_parameters() if n in key_biases(model)}
    return {id(p) for m in modules for p in m.parameters()} - ignored


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_selects_the_last_block_and_the_head(family):
    torch.manual_seed(0)
    model = tiny_family_model(family, layers=LAYERS)
    names = select_influence_params(model, "auto")
    params = dict(model.named_parameters())
    expected = auto_modules(family, model)
    assert {id(params[n]) for n in names} == ids_of(expected, model)
    assert count(model, names) == sum(p.numel() for p in params.values() if id(p) in ids_of(expected, model))
    assert 0 < count(model, names) < sum(p.numel() for p in model.parameters())
    # in the model's own order, no duplicates
    assert names == [n for n in params if n in set(names)]
    # nothing from the embeddings or any lower block
    stack = find_layer_stack(model)
    assert len(stack.layers) == LAYERS
    assert not any("embeddings" in n for n in names)
    assert not any(n.startswith(stack.layer_prefix(i)) for n in names for i in range(LAYERS - 1))
    assert first_influence_layer(model, stack, names) == LAYERS - 1


def test_electra_embeddings_project_is_not_an_influence_parameter():
    model = tiny_family_model("electra", layers=LAYERS, hidden=16)
    assert model.config.embedding_size != model.config.hidden_size
    assert isinstance(model.electra.embeddings_project, torch.nn.Linear)
    names = select_influence_params(model, "auto")
    assert not any(n.startswith("electra.embeddings_project") for n in names)


def test_explicit_prefixes_select_exactly_those_modules():
    model = tiny_family_model("bert", layers=12, hidden=8, heads=2, intermediate=8)
    names = select_influence_params(model, ("bert.encoder.layer.1", "bert.pooler", "classifier"))
    expected = [model.bert.encoder.layer[1], model.bert.pooler, model.classifier]
    params = dict(model.named_parameters())
    # "bert.encoder.layer.1" covers layer 1 only, not layers 10 and 11
    assert {id(params[n]) for n in names} == ids_of(expected, model)
    assert not any(n.startswith(("bert.encoder.layer.10.", "bert.encoder.layer.11.")) for n in names)
    # a single string, a trailing dot and a full parameter name work too
    assert select_influence_params(model, "classifier") == ["classifier.weight", "classifier.bias"]
    assert select_influence_params(model, ("bert.encoder.layer.11.",)) == [
        n for n in params if n.startswith("bert.encoder.layer.11.") and n != "bert.encoder.layer.11.attention.self.key.bias"]
    assert select_influence_params(model, ("classifier.weight",)) == ["classifier.weight"]
    # layers 10 and 11 -> the prefix ends at block 10
    names = select_influence_params(model, ("bert.encoder.layer.10", "bert.encoder.layer.11", "classifier"))
    assert first_influence_layer(model, find_layer_stack(model), names) == 10


def test_bad_prefix_is_named_in_the_error():
    model = tiny_family_model("bert", layers=2)
    with pytest.raises(ParamSelectionError, match="'bert.encoder.layer.7'"):
        select_influence_params(model, ("classifier", "bert.encoder.layer.7"))
    with pytest.raises(ParamSelectionError, match="'classifer'"):
        select_influence_params(model, "classifer")
    with pytest.raises(ParamSelectionError, match="empty"):
        select_influence_params(model, ())


def test_engine_reports_a_bad_prefix(tmp_path):
    model = make_tiny_family(tmp_path / "model", "bert")
    train = write_jsonl(tmp_path / "train.jsonl", sentences(6))
    with pytest.raises(ParamSelectionError, match="'pooler'"):
        InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(params=("pooler",)), device="cpu")


# name -> (family, config, params, prefix cached?)
ENGINE_CASES = {
    "bert": ("bert", {}, "auto", True),
    "roberta": ("roberta", {}, "auto", True),
    "distilbert": ("distilbert", {}, "auto", True),
    "deberta-v2": ("deberta-v2", {}, "auto", True),
    # DeBERTa-v2 with the convolution after block 0 (as deberta-v2-xlarge has)
    "deberta-v2-conv": ("deberta-v2", {"conv_kernel_size": 3}, "auto", True),
    # the shared relative-position embeddings among the params: nothing can be cached (fallback)
    "deberta-v2-rel-embeddings": ("deberta-v2", {}, ("deberta.encoder.rel_embeddings", "deberta.encoder.layer.2", "pooler",
                                                     "classifier"), False),
    "electra": ("electra", {}, "auto", True),
}


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_scores_equal_the_naive_loop_on_every_family(name, tmp_path):
    family, config, params, prefixed = ENGINE_CASES[name]
    model = make_tiny_family(tmp_path / "model", family, seed=7, layers=LAYERS, initializer_range=0.3, **config)
    rows = sentences(16, seed=3, noise=0.2)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(params=params), device="cpu")
    engine.prepare()
    assert (engine.prefix is not None) == prefixed
    if prefixed:
        assert engine.prefix.first == LAYERS - 1
    assert engine.first_token.enabled == (family in ("bert", "roberta", "electra"))
    # cached activations go straight into the last block and head (fastif/top.py) where the family allows
    assert (engine.objective.top is not None) == (prefixed and family in ("bert", "roberta", "electra"))
    ref = Reference(model, engine.names)
    assert engine.num_params == ref.num_params
    direction = torch.randn(engine.num_params, generator=torch.Generator().manual_seed(1))
    grads = ref.gradients(rows)
    assert len({round(float(x), 7) for x in grads @ direction.double()}) > 8  # the examples differ
    assert_close(engine.score(direction, range(len(rows)), batch_size=5), -(grads @ direction.double()), rtol=1e-5)
    vector = torch.stack([direction])
    assert_close(engine.hvp([0, 3, 9], vector)[0], ref.hvp([rows[i] for i in (0, 3, 9)], direction.double()), rtol=1e-4)
