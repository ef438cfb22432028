"""How many intra-op threads torch gets in a process: its share of the cores it may run on.

Torch starts as many threads as the machine has cores, whatever else runs. On a 2-core
machine shared with another busy process, two threads per process ran LiSSA's steps about
30× slower than one: the threads of a step wait for each other, and each wait lasts as long
as the other process keeps the core. So a process takes ``cores // processes`` threads, the
processes being the pool processes of one worker (``--concurrency``); ``FASTIF_TORCH_THREADS``,
or else ``OMP_NUM_THREADS``, overrides the rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_VARIABLE = "FASTIF_TORCH_THREADS"


def torch_threads(cores: int, processes: int, environ: Mapping[str, str]) -> int:
    """Threads for one of ``processes`` processes sharing ``cores``: ``FASTIF_TORCH_THREADS`` if set (a value that
    is not a whole number >= 1 is a ValueError), else ``OMP_NUM_THREADS`` if set, else max(1, cores // processes)."""
    given = environ.get(THREADS_VARIABLE, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"{THREADS_VARIABLE} must be a whole number >= 1, got {given!r}")
        return int(given)
    # OpenMP's own variable, which torch reads too: a count per process the environment already asks for
    # (its first level, when it lists nested ones).
    openmp = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if openmp.isdigit() and int(openmp) >= 1:
        return int(openmp)
    return max(1, cores // max(1, processes))


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (which taskset and container cpusets narrow), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1
