"""``fastif analyze``: the engine on one machine, printed as a table or as JSON."""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table


def _fail(message: str) -> None:
    typer.echo(f"fastif: error: {message}", err=True)
    raise typer.Exit(2)


def run(**opts) -> None:
    import torch  # imported here so --help stays fast

    from fastif import DataSpec, FastIFError, IndexConfig, InfluenceEngine, InfluenceSpec, LissaConfig, Query
    from fastif.config import CURVATURES, SOLVERS, SolverConfig
    from fastif.progress import rich_progress
    from fastif.threads import available_cores, torch_threads
    from workers.results import result_items

    # The command has the machine to itself: every core it may use, unless told (fastif/threads.py says why).
    if opts["threads"] is not None and opts["threads"] < 1:
        _fail(f"--threads must be at least 1, not {opts['threads']}")
    try:
        torch.set_num_threads(opts["threads"] or torch_threads(available_cores(), 1, os.environ))
    except ValueError as err:
        _fail(str(err))

    texts, pairs, labels = opts["text"], opts["text_pair"] or [], opts["label"] or []
    if pairs and len(pairs) != len(texts):
        _fail(f"--text-pair given {len(pairs)} times for {len(texts)} --text inputs")
    if labels and len(labels) != len(texts):
        _fail(f"--label given {len(labels)} times for {len(texts)} --text inputs")
    # --damp and --scale without --solver: FastIF's LiSSA on the Hessian, as before solvers were selectable
    # (the API's rule for a request that gives lissa.damp and lissa.scale alone).
    fastif_style = opts["solver"] is None and opts["damp"] is not None
    opts["solver"] = opts["solver"] or ("lissa" if fastif_style else "ekfac")
    opts["curvature"] = opts["curvature"] or ("hessian" if fastif_style else "gauss-newton")
    if opts["damping_scope"] not in (None, "curvature", "block"):
        _fail(f"--damping-scope must be curvature or block, not {opts['damping_scope']!r}")
    if opts["solver"] not in SOLVERS:
        _fail(f"--solver must be one of {', '.join(SOLVERS)}, not {opts['solver']!r}")
    if opts["curvature"] not in CURVATURES:
        _fail(f"--curvature must be one of {', '.join(CURVATURES)}, not {opts['curvature']!r}")
    if (opts["damp"] is None) != (opts["scale"] is None):
        _fail("give --damp and --scale together (LiSSA exactly as given), or neither (derived from the spectrum)")
    if opts["damp"] is not None and opts["solver"] != "lissa":
        _fail("--damp and --scale are LiSSA's; for other solvers give --damping")
    if opts["quoting"] not in ("minimal", "none"):
        _fail(f"--quoting must be minimal or none, not {opts['quoting']!r}")
    if opts["index_space"] not in ("gradient", "feature"):
        _fail(f"--index-space must be gradient or feature, not {opts['index_space']!r}")
    if opts["k"] < 0 or opts["top"] < 1:
        _fail("--k must be >= 0 and --top >= 1")
    try:
        absolute = opts["damp"] is not None
        lissa = LissaConfig(damp=opts["damp"] if absolute else 5e-3, scale=opts["scale"] if absolute else 1e4,
                            depth=opts["depth"], batch_size=opts["batch_size"], repeats=opts["repeats"], seed=opts["seed"])
        solver = SolverConfig(solver=opts["solver"], curvature=opts["curvature"],
                              damping=lissa.damping if absolute else opts["damping"], damping_ratio=opts["damping_ratio"],
                              damping_scope=opts["damping_scope"], lissa=lissa, lissa_absolute=absolute,
                              **({"inverse_rank_tolerance": opts["inverse_rank_tolerance"]}
                                 if opts["inverse_rank_tolerance"] is not None else {}))
        spec = InfluenceSpec(params=tuple(opts["params"]) if opts["params"] else "auto",
                             weight_decay=opts["weight_decay"], max_length=opts["max_length"])
    except ValueError as err:
        _fail(str(err))
    queries = [
        Query(text=t, text_pair=pairs[i] if pairs else None, label=(int(labels[i]) if labels and labels[i].isdigit() else (labels[i] if labels else None)))
        for i, t in enumerate(texts)
    ]
    data = DataSpec(path=str(opts["train"]), text_field=opts["text_field"], text_pair_field=opts["text_pair_field"],
                    label_field=opts["label_field"], quoting=opts["quoting"])
    try:
        engine = InfluenceEngine.from_paths(opts["model"], data, spec, IndexConfig(space=opts["index_space"]),
                                            artefact_dir=opts["artefacts"], device=opts["device"],
                                            compile_hvp=opts["compile_hvp"])
        with rich_progress(enabled=sys.stderr.isatty()) as on_progress:
            encoded, influences = engine.analyze(queries, k=opts["k"] or None, solver=solver, group=opts["group"],
                                                 on_progress=on_progress)
    except (FastIFError, ValueError) as err:
        _fail(str(err))
    for index, influence in enumerate(influences):
        if not influence.converged:
            details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in influence.solver.items()
                                if k in ("solver", "iterations", "relative_residual", "damping"))
            typer.echo(f"fastif: warning: input {index}: the solver did not converge ({details}); "
                       "the scores are an estimate of what it was asked", err=True)
    items = result_items(engine, encoded, influences, opts["top"], with_scores=opts["as_json"])
    if opts["as_json"]:
        for item in items:
            item.pop("input_index", None)
        typer.echo(json.dumps({"inputs": items}))
        return
    _print_tables(items)


def _print_tables(items: list[dict]) -> None:
    console = Console()
    for index, item in enumerate(items):
        pred = item["prediction"]
        console.print(f"\n[bold]input {index}[/]: predicted [bold]{pred['label']}[/] "
                      f"({pred['probs'][pred['label']]:.2f}), influence w.r.t. label [bold]{item['label_used']}[/]")
        for title, rows, colour in (("most helpful", item["helpful"], "green"), ("most harmful", item["harmful"], "red")):
            table = Table(title=title, title_style=colour, show_lines=False)
            for column in ("train #", "score", "label", "text"):
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(str(row["train_index"]), f"{row['score']:+.4g}", row["label"], row["text"][:120])
            console.print(table)
