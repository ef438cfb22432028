"""bench/mutmut_plugin.py: the order `make mutate` runs a mutant's tests in, and the fork server's frozen heap."""

from __future__ import annotations

import gc
import json
from types import SimpleNamespace

from bench import mutmut_plugin


def items(*nodeids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=nodeid) for nodeid in nodeids]


def test_cheap_modules_first_fastest_first_within_each_module(tmp_path):
    (tmp_path / mutmut_plugin.STATS).write_text(json.dumps({"duration_by_test": {
        "tests/a.py::slow": 3.0, "tests/a.py::fast": 0.5,  # module a: 3.5 s in all
        "tests/b.py::one": 1.0, "tests/b.py::two": 0.2,  # module b: 1.2 s
        "tests/c.py::only": 2.0,
    }}))
    config = SimpleNamespace(rootpath=tmp_path)
    collected = items("tests/a.py::slow", "tests/c.py::only", "tests/b.py::one", "tests/a.py::fast", "tests/b.py::two",
                      "tests/b.py::new")  # a test the stats run never saw counts as free
    mutmut_plugin.pytest_collection_modifyitems(config, collected)
    assert [item.nodeid for item in collected] == [
        "tests/b.py::new", "tests/b.py::two", "tests/b.py::one", "tests/c.py::only", "tests/a.py::fast", "tests/a.py::slow"]


def test_without_mutmuts_stats_the_order_is_left_alone(tmp_path):
    collected = items("tests/z.py::x", "tests/a.py::y")
    mutmut_plugin.pytest_collection_modifyitems(SimpleNamespace(rootpath=tmp_path), collected)
    assert [item.nodeid for item in collected] == ["tests/z.py::x", "tests/a.py::y"]


def test_only_a_collect_only_session_freezes_the_heap():
    gc.unfreeze()
    try:
        mutmut_plugin.pytest_unconfigure(SimpleNamespace(option=SimpleNamespace(collectonly=False)))
        assert gc.get_freeze_count() == 0
        mutmut_plugin.pytest_unconfigure(SimpleNamespace(option=SimpleNamespace(collectonly=True)))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
