"""``fastif``: analyze locally, serve the API, run workers or the whole stack, demo, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .client_commands import register_commands

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FastIF: which training examples made a text classifier predict what it predicted.")


def fail(message: str, code: int = 2) -> None:
    """A one-line error on stderr and a non-zero exit, never a traceback."""
    typer.echo(f"fastif: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def analyze(
    model: Annotated[Path, typer.Option(help="Hugging Face classifier directory (safetensors)")],
    train: Annotated[Path, typer.Option(help="training data: .jsonl, .csv, .tsv or a saved HF dataset")],
    text: Annotated[list[str], typer.Option(help="test input text (repeat for several inputs)")],
    text_pair: Annotated[Optional[list[str]], typer.Option(help="second text of each input (NLI)")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="label of each input; default: the prediction")] = None,
    text_field: Annotated[str, typer.Option(help="field of the training text")] = "text",
    text_pair_field: Annotated[Optional[str], typer.Option(help="field of the training pair text")] = None,
    label_field: Annotated[str, typer.Option(help="field of the training label")] = "label",
    quoting: Annotated[str, typer.Option(help="CSV/TSV quoting: minimal or none (SST-2 needs none)")] = "minimal",
    params: Annotated[Optional[list[str]], typer.Option(help="influence parameter-name prefix (repeat); default auto")] = None,
    weight_decay: Annotated[float, typer.Option(help="explicit L2 term (biases and LayerNorm excluded)")] = 0.0,
    max_length: Annotated[int, typer.Option(help="tokens per input")] = 128,
    k: Annotated[int, typer.Option(help="kNN candidates; 0 scores every training example")] = 1000,
    index_space: Annotated[str, typer.Option(help="kNN space: gradient (output-layer gradients) or feature (FastIF's)")] = "gradient",
    top: Annotated[int, typer.Option(help="helpful and harmful examples to show")] = 10,
    solver: Annotated[Optional[str], typer.Option(help="ekfac (default), kfac, lissa, cg or identity (gradient dot product); "
                                                  "--damp and --scale alone mean lissa")] = None,
    curvature: Annotated[Optional[str], typer.Option(help="gauss-newton (default) or hessian (the default of "
                                                     "--damp/--scale without --solver, as FastIF)")] = None,
    damping: Annotated[Optional[float], typer.Option(help="absolute λ; default: --damping-ratio × the mean eigenvalue")] = None,
    damping_ratio: Annotated[Optional[float], typer.Option(help="λ relative to the mean eigenvalue (default: the service's)")] = None,
    damping_scope: Annotated[Optional[str], typer.Option(help="curvature: the whole curvature's mean eigenvalue; block "
                                                         "(ekfac, kfac): each block's own")] = None,
    inverse_rank_tolerance: Annotated[Optional[float], typer.Option(
        help="ekfac, kfac: the damped inverse's eigenvalues at the least rank matching them to this fraction; "
             "0: exactly (default: the service's, 1e-3)")] = None,
    damp: Annotated[Optional[float], typer.Option(help="LiSSA damp, with --scale: used exactly (FastIF: 0.005)")] = None,
    scale: Annotated[Optional[float], typer.Option(help="LiSSA scale, with --damp (FastIF: 1e4)")] = None,
    depth: Annotated[int, typer.Option(help="LiSSA steps J")] = 1000,
    batch_size: Annotated[int, typer.Option(help="LiSSA batch B")] = 1,
    repeats: Annotated[int, typer.Option(help="LiSSA repeats T")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    group: Annotated[bool, typer.Option(help="treat all inputs as one query")] = False,
    artefacts: Annotated[Optional[Path], typer.Option(help="folder to keep features and the index between runs")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda; default: cuda when present")] = None,
    compile_hvp: Annotated[bool, typer.Option("--compile", help="torch.compile the HVP: 10-30 s once, then faster LiSSA steps")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads; default FASTIF_TORCH_THREADS, "
                                                   "else every core this process may use")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with every candidate's score")] = False,
) -> None:
    """Run the engine locally, without the service."""
    from . import analyze_command

    analyze_command.run(**locals())


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """The HTTP API alone, against REDIS_URL."""
    from .stack import serve_api

    serve_api(host, port)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: cpu, accel")] = "cpu,accel",
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 1,
    hostname: Annotated[Optional[str], typer.Option(help="Celery node name")] = None,
) -> None:
    """A Celery worker alone, against REDIS_URL."""
    from .stack import run_worker

    run_worker(queues, concurrency, hostname)


@app.command()
def standalone(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes")] = 2,
    ephemeral: Annotated[bool, typer.Option(
        help="the embedded Redis keeps nothing on disk: models, jobs and results are gone when it stops")] = False,
) -> None:
    """Redis (embedded unless REDIS_URL is set), N workers and the API, in the foreground.

    The embedded Redis keeps an append-only file in the state directory, so a restart finds every model, job and result.
    """
    from .stack import run_standalone

    run_standalone(host, port, workers, ephemeral)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo keeps its data and model")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="tiny model and data (seconds)")] = False,
) -> None:
    """The README's main job end to end, on a model and data it makes itself."""
    from .demo import run_demo

    run_demo(workdir, quick)


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="speed, recall, stest, batch, service, lds, correct or scale")],
    data: Annotated[Optional[Path], typer.Option(help="training data (default: SST-2 train from ../shared/data)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="fine-tuned classifier directory (made once if absent)")] = None,
    quick: Annotated[bool, typer.Option(help="tiny model and data, seconds")] = False,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
) -> None:
    """The benchmarks; writes bench/results/SUITE.md and SUITE.json."""
    from bench.runner import run_suite

    run_suite(suite, data=data, model=model, quick=quick, out=out)


# models, register, submit, jobs, results, cancel: a running service through fastif_client.
register_commands(app)

if __name__ == "__main__":
    sys.exit(app())
