"""``fastif bench SUITE``: set up the shared model and data, run one suite, write its results."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

from .common import Clock, log
from .setup import SetupError, make_setup

SUITES = ("speed", "recall", "stest", "batch", "service", "lds", "correct", "scale")


def run_suite(suite: str, data: Path | None = None, model: Path | None = None, quick: bool = False,
              out: Path = Path("bench/results")) -> dict:
    """Run ``suite`` and write ``out/SUITE.md`` and ``out/SUITE.json``; returns the headline figures."""
    if suite not in SUITES:
        _fail(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    clock = Clock()
    _threads(quick)
    module = importlib.import_module(f"bench.{suite}")
    if not getattr(module, "NEEDS_SETUP", True):  # a suite that trains its own model on the shared data
        headline = module.run_standalone(data, quick, Path(out))
        log(f"[bold]{suite}[/] done in {clock.seconds:.0f} s: " + ", ".join(f"{k} = {v}" for k, v in headline.items()))
        return headline
    try:
        setup = make_setup(data, model, quick, log=log)
    except (SetupError, ValueError, OSError) as err:
        _fail(str(err))
    try:
        headline = module.run(setup, Path(out))
    finally:
        setup.close()
    log(f"[bold]{suite}[/] done in {clock.seconds:.0f} s: " + ", ".join(f"{k} = {v}" for k, v in headline.items()))
    log(f"wrote {Path(out) / (suite + '.md')} and {Path(out) / (suite + '.json')}")
    return headline


def _threads(quick: bool) -> None:
    """FASTIF_BENCH_THREADS sets torch's threads; --quick uses one (a tiny model gains nothing from two, and
    two OpenMP threads on a shared 2-core machine stall each other badly)."""
    import os

    import torch

    wanted = os.environ.get("FASTIF_BENCH_THREADS")
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
    elif quick:
        torch.set_num_threads(1)


def _fail(message: str) -> None:
    print(f"fastif: error: {message}", file=sys.stderr)
    raise typer.Exit(2)
