"""Progress reporting: the engine calls ``on_progress(stage, done, total)``.

A callback that returns True asks the running computation to stop (cancellation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ProgressCallback = Callable[[str, int, int], bool | None]


def stage_callback(on_progress: ProgressCallback | None, stage: str) -> Callable[[int, int], bool]:
    """``on_step(done, total)`` for a solver: ``on_progress`` under the name ``stage``."""

    def on_step(done: int, total: int) -> bool:
        return bool(on_progress(stage, done, total)) if on_progress else False

    return on_step


@contextmanager
def rich_progress(enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A progress bar per stage on stderr; yields None when disabled."""
    if not enabled:
        yield None
        return
    bars = Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> bool:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)
        return False

    with bars:
        yield update
