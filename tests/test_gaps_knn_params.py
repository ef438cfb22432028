"""kNN (fastif/knn.py) and parameter selection (fastif/params.py) against brute force and hand-written expectations.

Small arrays and tiny in-memory models only: fast enough for mutation testing.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
from torch import nn

from fastif import knn
from fastif.config import IndexConfig
from fastif.errors import ParamSelectionError
from fastif.params import (LayerStack, _under, above_prefix, count, decay_mask, find_layer_stack, first_influence_layer,
                           flatten, freeze_all_but, key_biases, select_influence_params)
from tiny import tiny_family_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the gradient keys --------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_zero_sum_basis_is_orthonormal_and_spans_the_zero_sum_vectors(classes):
    basis = knn.zero_sum_basis(classes)
    assert basis.shape == (classes, classes - 1) and basis.dtype == np.float64
    np.testing.assert_allclose(basis.T @ basis, np.eye(classes - 1), atol=1e-12)
    np.testing.assert_allclose(basis.sum(axis=0), 0.0, atol=1e-12)
    projector = basis @ basis.T  # onto the vectors that sum to zero: I - 11ᵀ/C
    np.testing.assert_allclose(projector, np.eye(classes) - np.ones((classes, classes)) / classes, atol=1e-12)


def test_two_class_basis_is_written_out():
    np.testing.assert_allclose(knn.zero_sum_basis(2), [[1 / math.sqrt(2)], [-1 / math.sqrt(2)]], atol=1e-15)
    three = knn.zero_sum_basis(3)
    np.testing.assert_allclose(three[:, 1], [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)], atol=1e-15)


@pytest.mark.parametrize("classes", [2, 4])
def test_gradient_keys_inner_products_are_those_of_the_explicit_gradients(classes):
    rng = np.random.default_rng(classes)
    logits = rng.normal(size=(7, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, classes, size=7)
    inputs = rng.normal(size=(7, 5))
    keys = knn.gradient_keys(probs, labels, inputs)
    assert keys.shape == (7, (classes - 1) * 5) and keys.dtype == np.float32 and keys.flags["C_CONTIGUOUS"]
    grads = np.stack([np.outer(p - np.eye(classes)[y], a).reshape(-1) for p, y, a in zip(probs, labels, inputs)])
    np.testing.assert_allclose(keys.astype(np.float64) @ keys.T.astype(np.float64), grads @ grads.T, rtol=1e-5, atol=1e-6)
    assert np.array_equal(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True))  # the input is not changed


@pytest.mark.parametrize("classes", [2, 3])
def test_gradient_keys_of_float32_inputs_are_computed_in_float64_and_rounded_once(classes):
    # the engine hands over float64 probabilities and float32 activations, a caller may hand over float32 for both:
    # the keys must be the float64 computation rounded once, whatever the inputs' precision
    rng = np.random.default_rng(10 + classes)
    probs = rng.dirichlet(np.ones(classes), size=50).astype(np.float32)
    labels = [int(y) for y in rng.integers(0, classes, size=50)]
    inputs = rng.normal(size=(50, 6)).astype(np.float32)
    residual = probs.astype(np.float64) - np.eye(classes)[labels]
    wide = (residual @ knn.zero_sum_basis(classes))[:, :, None] * inputs.astype(np.float64)[:, None, :]
    assert np.array_equal(knn.gradient_keys(probs, labels, inputs), wide.reshape(50, -1).astype(np.float32))


# -- the index ------------------------------------------------------------------------------------------
def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("space", ["gradient", "feature"])
def test_index_kinds_and_metrics(space):
    data = vectors(600, 8, seed=1)
    inner = faiss.METRIC_INNER_PRODUCT if space == "gradient" else faiss.METRIC_L2
    flat = knn.build_index(data, IndexConfig(kind="flat", space=space))
    assert type(flat) is (faiss.IndexFlatIP if space == "gradient" else faiss.IndexFlatL2) and flat.ntotal == 600
    assert flat.metric_type == inner
    ivf = knn.build_index(data, IndexConfig(kind="ivf", space=space, nprobe=4))
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.ntotal == 600
    # the gradient space's IVF holds its keys lifted onto a sphere, one number more, under L2 (knn.SphereLift)
    assert ivf.metric_type == faiss.METRIC_L2 and ivf.d == 8 + (space == "gradient")
    assert knn.inner_product(ivf, 8) == knn.inner_product(flat, 8) == (space == "gradient")
    assert ivf.nlist == max(1, min(600 // 39, int(4 * math.sqrt(600)))) == 15 and ivf.nprobe == 4
    wide = knn.build_index(data, IndexConfig(kind="ivf", space=space, nlist=3, nprobe=16))
    assert wide.nlist == 3 and wide.nprobe == 3  # never more probes than cells
    small = knn.build_index(data[:255], IndexConfig(kind="ivf", space=space))
    assert type(small) is type(flat) and small.ntotal == 255
    exactly = knn.build_index(data[:256], IndexConfig(kind="ivf", space=space))
    assert isinstance(exactly, faiss.IndexIVFFlat) and exactly.nlist == 6
    tiny_ivf = knn.build_index(data[:256], IndexConfig(kind="ivf", space=space, nlist=None, nprobe=1))
    assert tiny_ivf.nprobe == 1
    hnsw = knn.build_index(data, IndexConfig(kind="hnsw", space=space, hnsw_m=12))
    assert isinstance(hnsw, faiss.IndexHNSWFlat) and hnsw.metric_type == inner and hnsw.ntotal == 600
    assert hnsw.hnsw.nb_neighbors(1) == 12
    with pytest.raises(ValueError):
        knn.build_index(data, IndexConfig(kind="lsh", space=space))


def test_default_ivf_cells_follow_both_bounds():
    """nlist = max(1, min(N // 39, int(4 √N))): 39 points per cell, at most 4 √N cells."""
    for n in (780, 1000):
        index = knn.build_index(vectors(n, 2, seed=n), IndexConfig(kind="ivf", space="feature"))
        assert index.nlist == n // 39  # 20 and 25
    big = knn.build_index(vectors(25_000, 2, seed=9), IndexConfig(kind="ivf", space="feature"))
    assert big.nlist == int(4 * math.sqrt(25_000)) == 632  # here 4 √N is the smaller


def test_index_round_trips_through_a_file(tmp_path):
    data = vectors(50, 6, seed=2)
    index = knn.build_index(data, IndexConfig())
    loaded = knn.write_index(data, IndexConfig(), tmp_path / "i.faiss")
    key = data[3] * 2
    assert np.array_equal(knn.search(loaded, key, 7), knn.search(index, key, 7))


def strongest(data: np.ndarray, key: np.ndarray, k: int, side: str) -> np.ndarray:
    products = data.astype(np.float64) @ key.astype(np.float64)
    if side == "aligned":
        return np.argsort(-products, kind="stable")[:k]
    if side == "opposed":
        return np.argsort(products, kind="stable")[:k]
    return np.argsort(-np.abs(products), kind="stable")[:k]


@pytest.mark.parametrize("side", ["both", "aligned", "opposed"])
@pytest.mark.parametrize("k", [1, 5, 40, 100])
def test_gradient_search_each_side_against_brute_force(side, k):
    data = vectors(40, 6, seed=3)
    key = vectors(1, 6, seed=4)[0]
    index = knn.build_index(data, IndexConfig(space="gradient"))
    found = knn.search(index, key, k, side=side)
    expected = strongest(data, key, min(k, 40), side)
    assert found.dtype.kind == "i" and found.tolist() == expected.tolist()


def test_both_sides_take_the_strongest_of_either_sign_without_repeats():
    # 3 strongly opposed, 2 weakly aligned, 1 orthogonal (inner product 0 on both searches)
    data = np.array([[-5, 0], [-4, 0], [-3, 0], [1, 0], [2, 0], [0, 1]], dtype=np.float32)
    index = knn.build_index(data, IndexConfig(space="gradient"))
    key = np.array([1.0, 0.0], dtype=np.float32)
    assert knn.search(index, key, 3).tolist() == [0, 1, 2]
    assert knn.search(index, key, 4).tolist() == [0, 1, 2, 4]
    everything = knn.search(index, key, 6)
    assert sorted(everything.tolist()) == list(range(6)) and everything.tolist()[:5] == [0, 1, 2, 4, 3]
    assert knn.search(index, key, 2, side="aligned").tolist() == [4, 3]
    assert knn.search(index, key, 2, side="opposed").tolist() == [0, 1]
    assert knn.search(index, key, 50, side="aligned").tolist()[:2] == [4, 3]
    assert len(knn.search(index, key, 50, side="aligned")) == 6
    with pytest.raises(ValueError):
        knn.search(index, key, 2, side="sideways")


def test_ties_in_strength_keep_the_order_the_two_searches_returned():
    rng = np.random.default_rng(3)
    scale = rng.choice([1.0, 2.0], size=60)
    sign = rng.choice([-1.0, 1.0], size=60)
    data = np.zeros((60, 3), dtype=np.float32)
    data[:, 0] = scale * sign  # |⟨key, x⟩| is 1 or 2: thirty-odd ties each
    index = knn.build_index(data, IndexConfig(space="gradient"))
    key = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    aligned_s, aligned = index.search(key[None], 50)
    opposed_s, opposed = index.search(-key[None], 50)
    ids = np.concatenate([aligned[0], opposed[0]])
    strength = np.concatenate([aligned_s[0], opposed_s[0]])
    expected, seen = [], set()
    for j in sorted(range(len(ids)), key=lambda j: (-strength[j], j)):
        if ids[j] >= 0 and ids[j] not in seen:
            seen.add(int(ids[j]))
            expected.append(int(ids[j]))
    assert knn.search(index, key, 50).tolist() == expected[:50]


@pytest.mark.parametrize("k", [1, 6, 30])
def test_feature_search_is_the_l2_nearest(k):
    data = vectors(30, 5, seed=5)
    query = vectors(1, 5, seed=6)[0]
    index = knn.build_index(data, IndexConfig(space="feature"))
    distances = ((data.astype(np.float64) - query) ** 2).sum(1)
    expected = np.argsort(distances, kind="stable")[:k]
    for side in ("both", "aligned", "opposed"):  # the side means nothing in the feature space
        assert knn.search(index, query, k, side=side).tolist() == expected.tolist()


def test_hnsw_searches_deep_enough_for_large_k():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(20, 16)) * 4
    data = (centres[rng.integers(0, 20, size=3000)] + rng.normal(size=(3000, 16))).astype(np.float32)
    index = knn.build_index(data, IndexConfig(kind="hnsw", space="feature"))
    query = data[11] + 0.1
    exact = set(np.argsort(((data - query) ** 2).sum(1))[:200].tolist())
    found = knn.search(index, query, 200)
    assert len(found) == 200 and len(exact & set(found.tolist())) / 200 >= 0.9
    assert index.hnsw.efSearch == 16  # the search depth is a per-query parameter, the index is unchanged


# -- which parameters -----------------------------------------------------------------------------------------
def test_under_is_a_whole_component_prefix():
    assert _under("bert.encoder.layer.5.output.dense.weight", "bert.encoder.layer.5")
    assert _under("bert.encoder.layer.5.output.dense.weight", "bert.encoder.layer.5.")
    assert _under("classifier.weight", "classifier.weight")
    assert not _under("bert.encoder.layer.50.output.dense.weight", "bert.encoder.layer.5")
    assert not _under("classifier", "classifier.weight")
    assert not _under("xclassifier.weight", "classifier")


class Blocks(nn.Module):
    """Two lists of blocks: the longer of one type is the encoder, whatever else the model holds."""

    def __init__(self):
        super().__init__()
        self.short = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()])
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.empty = nn.ModuleList()


def test_layer_stack_is_the_longest_list_of_one_block_type():
    stack = find_layer_stack(Blocks())
    assert stack.path == "body.layers" and stack.encoder_path == "body" and len(stack.layers) == 3
    assert stack.layer_prefix(2) == "body.layers.2."
    tied = nn.Module()
    tied.a = nn.ModuleList([nn.Linear(2, 2)] * 2)
    tied.b = nn.ModuleList([nn.Linear(2, 2)] * 2)
    assert find_layer_stack(tied).path == "a"  # the first of equals
    with pytest.raises(ParamSelectionError):
        find_layer_stack(nn.Sequential(nn.Linear(2, 2)))
    top = nn.Module()
    top.layers = nn.ModuleList([nn.Linear(2, 2)] * 2)
    assert find_layer_stack(top).encoder_path == ""


def bert():
    torch.manual_seed(0)
    return tiny_family_model("bert", layers=3)


def test_auto_and_prefixes_select_in_model_order():
    model = bert()
    names = [n for n, _ in model.named_parameters()]
    auto = select_influence_params(model)
    expected = [n for n in names if n.startswith(("bert.encoder.layer.2.", "bert.pooler.", "classifier."))
                and n != "bert.encoder.layer.2.attention.self.key.bias"]
    assert auto == expected
    chosen = select_influence_params(model, ["classifier", "bert.encoder.layer.0"])
    assert chosen == [n for n in names if n.startswith(("bert.encoder.layer.0.", "classifier."))
                      and n != "bert.encoder.layer.0.attention.self.key.bias"]
    assert select_influence_params(model, "bert.pooler") == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    with pytest.raises(ParamSelectionError):
        select_influence_params(model, [])
    with pytest.raises(ParamSelectionError):
        select_influence_params(model, ["classifier", "nothing"])


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_attention_key_biases_never_change_the_output_and_are_left_out(family):
    """Each bias ``key_biases`` names can be changed at will without changing the logits (softmax ignores a score
    added to every key), and no selection holds one."""
    torch.manual_seed(0)
    model = tiny_family_model(family, layers=2).eval()
    biases = key_biases(model)
    assert len(biases) == 2  # one per layer
    params = dict(model.named_parameters())
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        for name in biases:
            params[name].add_(torch.randn_like(params[name]))
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not biases & set(select_influence_params(model))
    assert not biases & set(select_influence_params(model, [n.split(".")[0] for n in params]))
    with pytest.raises(ParamSelectionError, match="key biases"):
        select_influence_params(model, sorted(biases))


def test_a_key_bias_that_does_change_the_output_is_kept():
    """DeBERTa's relative attention also adds the key projection (bias included) to the position terms of
    each query: there the key bias matters, and it is an influence parameter like any other."""
    model = tiny_family_model("deberta-v2", layers=2)
    assert key_biases(model) == set()
    assert any(n.endswith("key_proj.bias") for n in select_influence_params(model))


def test_first_influence_layer_and_what_lies_above_the_prefix():
    model = bert()
    stack = find_layer_stack(model)
    names = [n for n, _ in model.named_parameters()]
    assert first_influence_layer(model, stack, select_influence_params(model)) == 2
    assert first_influence_layer(model, stack, select_influence_params(model, ["bert.encoder.layer.1", "classifier"])) == 1
    assert first_influence_layer(model, stack, select_influence_params(model, "classifier")) == 3  # above every block
    assert first_influence_layer(model, stack, select_influence_params(model, "bert.pooler")) == 3
    assert first_influence_layer(model, stack, select_influence_params(model, ["bert.embeddings", "classifier"])) is None
    assert first_influence_layer(model, stack, ["bert.embeddings.LayerNorm.weight"]) is None
    assert first_influence_layer(model, stack, []) == 3
    above = above_prefix(model, stack, 1)
    assert above == [n for n in names if n.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2.", "bert.pooler.",
                                                       "classifier."))]
    assert above_prefix(model, stack, 3) == [n for n in names if n.startswith(("bert.pooler.", "classifier."))]
    assert above_prefix(model, stack, 0) == [n for n in names if not n.startswith("bert.embeddings.")]
    assert above_prefix(model, stack, None) == names


def test_a_parameter_shared_by_the_encoder_means_nothing_is_cached():
    class Shared(nn.Module):
        base_model_prefix = "base"

        def __init__(self):
            super().__init__()
            self.base = nn.Module()
            self.base.embed = nn.Linear(2, 2)
            self.base.encoder = nn.Module()
            self.base.encoder.rel = nn.Linear(2, 2)  # the encoder's own, shared by every block (DeBERTa)
            self.base.encoder.layer = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.base.after = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

    model = Shared()
    stack = find_layer_stack(model)
    assert stack.path == "base.encoder.layer" and stack.encoder_path == "base.encoder"
    assert select_influence_params(model) == ["base.encoder.layer.2.weight", "base.encoder.layer.2.bias",
                                              "base.after.weight", "base.after.bias", "head.weight", "head.bias"]
    assert first_influence_layer(model, stack, ["base.encoder.rel.weight"]) is None
    assert first_influence_layer(model, stack, ["base.embed.weight"]) is None
    assert first_influence_layer(model, stack, ["base.after.weight", "head.bias"]) == 3
    assert above_prefix(model, stack, 2) == ["base.encoder.layer.2.weight", "base.encoder.layer.2.bias",
                                             "base.after.weight", "base.after.bias", "head.weight", "head.bias"]


def test_a_model_whose_blocks_are_outside_its_base_model():
    class Outside(nn.Module):
        base_model_prefix = "base"

        def __init__(self, with_base: bool = True):
            super().__init__()
            if with_base:
                self.base = nn.Module()
                self.base.emb = nn.Linear(2, 2)
            self.stack = nn.Module()
            self.stack.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.head = nn.Linear(2, 2)

    for with_base in (True, False):
        model = Outside(with_base)
        stack = find_layer_stack(model)
        assert stack.path == "stack.layers" and stack.encoder_path == "stack"
        # nothing of the base model counts as running before the blocks: they are not inside it
        assert first_influence_layer(model, stack, ["head.weight"]) == 3
        if with_base:
            assert first_influence_layer(model, stack, ["base.emb.weight"]) == 3
        assert "head.weight" in above_prefix(model, stack, 2)


def test_a_single_block_is_a_layer_stack_and_names_ending_in_x_are_prefixes():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2)])
    assert find_layer_stack(model).path == "layers" and len(find_layer_stack(model).layers) == 1
    assert _under("layerX.weight", "layerX") and _under("layerX.weight", "layerX.")


def test_a_bad_prefix_error_shows_the_first_four_names():
    model = bert()
    first = [n for n, _ in model.named_parameters()][:4]
    with pytest.raises(ParamSelectionError) as raised:
        select_influence_params(model, "nothing")
    assert f"(names look like {', '.join(first)}, ...)" in str(raised.value)


def test_decay_mask_count_freeze_and_flatten():
    names = ["a.dense.weight", "a.dense.bias", "a.LayerNorm.weight", "b.layer_norm.weight", "c.norm.weight", "d.w"]
    ignores = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    assert decay_mask(names, ignores) == [True, False, False, False, False, True]
    assert decay_mask(names, ()) == [True] * 6
    model = bert()
    chosen = select_influence_params(model, "classifier")
    assert count(model, chosen) == 16 * 2 + 2
    assert count(model, []) == 0
    freeze_all_but(model, chosen)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == chosen
    freeze_all_but(model, [])
    assert not any(p.requires_grad for p in model.parameters())
    flat = flatten([torch.arange(6.0).reshape(2, 3), torch.tensor([7.0]), torch.zeros(0)])
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    assert isinstance(find_layer_stack(model), LayerStack)
