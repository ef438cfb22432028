"""The compiled H·v (fastif/compiled.py) against the naive double backward on an independent float64 copy.

Compiling takes tens of seconds once per process; every test here shares one engine's compilation
(torch.compile caches by code, so the second engine reuses it).
"""

from __future__ import annotations

import pytest
import torch

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig, Query
from tiny import Reference, assert_close, make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 24
# Every batch here has 3 examples: one shape, so one compilation for the whole module.
LISSA = LissaConfig(damp=0.01, scale=100.0, depth=40, batch_size=3, seed=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    model = make_tiny_family(root / "model", "bert", seed=5, layers=2, initializer_range=0.3)
    rows = sentences(NUM_TRAIN, seed=6, noise=0.2)
    return model, write_jsonl(root / "train.jsonl", rows), rows


def engine_of(files, weight_decay: float = 0.0, compile_hvp: bool = True) -> InfluenceEngine:
    engine = InfluenceEngine.from_paths(files[0], DataSpec(str(files[1])), InfluenceSpec(weight_decay=weight_decay),
                                        device="cpu", compile_hvp=compile_hvp)
    engine.prepare()
    return engine


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_compiled_hvp_equals_the_naive_double_backward(files, weight_decay):
    engine = engine_of(files, weight_decay)
    compiled = engine.objective.compiled
    assert compiled is not None and compiled.usable
    ref = Reference(files[0], engine.names, weight_decay=weight_decay)
    vectors = torch.randn(2, engine.num_params, generator=torch.Generator().manual_seed(3))
    for indices in ([0, 3, 9], [5, 5, 12], [2, 7, 23]):
        actual = engine.hvp(indices, vectors)
        for row in range(2):
            expected = ref.hvp([files[2][i] for i in indices], vectors[row].double())
            assert_close(actual[row], expected, rtol=1e-4)
    # the compiled program was used (and its first product checked against the eager one), not the fallback
    assert compiled.checked and compiled.usable


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lissa_with_the_compiled_step_equals_eager_lissa(files, weight_decay):
    compiled, eager = engine_of(files, weight_decay), engine_of(files, weight_decay, compile_hvp=False)
    assert eager.objective.compiled is None
    vectors = compiled.plan([Query("the film was dull"), Query("a lovely story", label="negative")]).vectors
    a = compiled.solve(vectors, LISSA)
    b = eager.solve(vectors, LISSA)
    # every step ran as one compiled program (the fused update), checked against the eager step first
    assert compiled.objective.compiled.step_checked and compiled.objective.compiled.usable
    assert_close(a.vectors, b.vectors, rtol=1e-4)
    assert a.norms == pytest.approx(b.norms, rel=1e-4)


def test_a_failing_compilation_falls_back_to_eager(files, monkeypatch, caplog):
    engine = engine_of(files)
    compiled = engine.objective.compiled

    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_compiled_step", broken)
    vectors = torch.randn(1, engine.num_params, generator=torch.Generator().manual_seed(4))
    with caplog.at_level("WARNING", logger="fastif.compiled"):
        actual = engine.hvp([1, 4, 8], vectors)
    assert not compiled.usable
    assert "no C++ compiler" in caplog.text
    assert_close(actual[0], engine.objective.autograd_hvp(*engine.training_batch([1, 4, 8]), vectors)[0], rtol=1e-6)
    # LiSSA goes on eagerly too
    eager = engine_of(files, compile_hvp=False)
    assert_close(engine.solve(vectors, LISSA).vectors, eager.solve(vectors, LISSA).vectors, rtol=1e-5)


def test_without_the_direct_top_nothing_is_compiled(tmp_path):
    model = make_tiny_family(tmp_path / "model", "distilbert", seed=5, layers=2, initializer_range=0.3)
    train = write_jsonl(tmp_path / "train.jsonl", sentences(8, seed=6))
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(), device="cpu", compile_hvp=True)
    assert engine.objective.top is None and engine.objective.compiled is None
