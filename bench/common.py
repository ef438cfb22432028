"""Shared pieces of the suites: timing, agreement metrics, progress bars and the results files."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def log(message: str) -> None:
    console.print(message, highlight=False)


@contextmanager
def bars() -> Iterator[Progress]:
    """Rich progress bars on stderr (one task per long loop)."""
    progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=False)
    with progress:
        yield progress


def engine_progress(progress: Progress):
    """An engine ``on_progress(stage, done, total)`` callback that draws one bar per stage."""
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> bool:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"engine: {stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)
        return False

    return update


def warm_prefix_cache(engine) -> None:
    """Read one value from every page of the memory-mapped prefix cache, as a worker that has
    served a few queries has: otherwise the first job to reach each page pays its fault."""
    if engine.prefix_store is not None:
        flat = engine.prefix_store.flat
        step = max(1, 4096 // (flat.shape[1] * flat.itemsize)) if flat.ndim == 2 else 1
        float(np.asarray(flat[::step, 0]).sum())


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


# -- agreement --------------------------------------------------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic
    return float(value) if value == value else float("nan")


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def top_overlap(reference: Sequence[float], other: Sequence[float], m: int, harmful: bool = False) -> float:
    """Fraction of the reference's m most helpful (lowest) or harmful (highest) positions that ``other`` also ranks top m."""
    reference, other = np.asarray(reference), np.asarray(other)
    m = min(m, len(reference))
    sign = -1.0 if harmful else 1.0
    ours = set(np.argsort(sign * reference, kind="stable")[:m].tolist())
    theirs = set(np.argsort(sign * other, kind="stable")[:m].tolist())
    return len(ours & theirs) / m if m else float("nan")


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# -- the results files --------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "commit": commit,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out: Path, suite: str, headline: dict, data: dict, markdown: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "headline": headline, **data, "environment": environment()}
    json_path = out / f"{suite}.json"
    json_path.write_text(json.dumps(_plain(payload), indent=1) + "\n")
    md_path = out / f"{suite}.md"
    md_path.write_text(markdown.rstrip() + "\n")
    return md_path, json_path


def headline_block(headline: dict) -> str:
    return "\n".join(f"- `{k}`: **{fmt(v) if not isinstance(v, str) else v}**" for k, v in headline.items())


def setup_block(setup, extra: Sequence[str] = ()) -> str:
    env = environment()
    lines = [f"- model: {setup.description['model']}", f"- data: {setup.description['data']}",
             f"- tokens per input: {setup.description['tokens']}",
             "- influence parameters: the last encoder block + pooler + classifier head (`params=auto`)",
             f"- machine: {env['cpus']} CPU cores, torch {env['torch']} ({env['torch_threads']} threads), "
             f"load average {env['load_avg_1m_at_end']} at the end (other processes share these cores)",
             *extra]
    if setup.quick:
        lines.insert(0, "- **quick mode**: tiny model and toy data; these numbers say nothing about speed goals")
    return "\n".join(lines)


def plot(path: Path, draw, panels: int = 1) -> Path:
    """Draw with matplotlib's Agg backend into ``path`` (PNG); ``draw`` gets one axis, or a list of ``panels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=110, squeeze=False)
    draw(axes[0][0] if panels == 1 else list(axes[0]))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
