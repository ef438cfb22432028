"""A pytest plugin for `make mutate` (loaded by ``[tool.mutmut] pytest_add_cli_args``), for speed only.

mutmut forks one process per mutant from a fork server that has imported torch, transformers and
every test module. Two things made each mutant cost seconds before its first test ran:

- Python's cyclic GC walks the whole inherited heap in the child, and writes to every object's
  header as it goes, so the child copies the server's pages. Freezing the heap in the server once
  it has collected the tests moves those objects out of the GC's reach (``gc.freeze``: "to avoid
  copy-on-write in child processes"). pytest's ``unraisableexception`` plugin calls ``gc.collect``
  at exit as well; ``-p no:unraisableexception`` sits next to this plugin's ``-p``.
- mutmut's fork server hands the tests over in no particular order and stops at the first
  failure (``-x``), so a mutant that a 10 ms test kills could first run a dozen slow ones. This
  plugin orders them as mutmut's plain fork runner does, fastest first by the durations mutmut
  measured in its stats run, keeping each test module's tests together so that a module's
  fixtures (a tiny engine, a Redis database) are built once per mutant.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

STATS = "mutmut-stats.json"  # written by mutmut into mutants/, the tests' working directory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stats = Path(config.rootpath) / STATS
    if not stats.is_file():
        return
    seconds = json.loads(stats.read_text())["duration_by_test"]

    def cost(item: pytest.Item) -> float:
        return seconds.get(item.nodeid, 0.0)

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    module_cost: dict[str, float] = {}
    for item in items:
        module_cost[module(item)] = module_cost.get(module(item), 0.0) + cost(item)
    items.sort(key=lambda item: (module_cost[module(item)], module(item), cost(item)))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # The fork server's warm-up is a --collect-only run; what it imported is what every mutant shares.
    if config.option.collectonly:
        gc.freeze()
