"""Torch's intra-op threads (fastif/threads.py): a worker pool process takes its share of the cores,
FASTIF_TORCH_THREADS (or else OMP_NUM_THREADS) overrides the share."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from fastif.threads import THREADS_VARIABLE, available_cores, torch_threads
from tiny import single_thread


@pytest.mark.parametrize("cores, processes, expected", [
    (8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 1, 2), (1, 4, 1), (3, 4, 1), (16, 0, 16),
])
def test_a_process_takes_its_share_of_the_cores(cores, processes, expected):
    assert torch_threads(cores, processes, {}) == expected


@pytest.mark.parametrize("environ, expected", [
    ({THREADS_VARIABLE: "3"}, 3),
    ({THREADS_VARIABLE: " 12 "}, 12),  # more than the share: the operator's choice
    ({THREADS_VARIABLE: "3", "OMP_NUM_THREADS": "1"}, 3),
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": "2,1"}, 2),  # nested levels: the first
    ({"OMP_NUM_THREADS": "many"}, 4),  # not ours to refuse: the share
    ({THREADS_VARIABLE: ""}, 4),
])
def test_the_environment_overrides_the_share(environ, expected):
    assert torch_threads(8, 2, environ) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_refused(value):
    with pytest.raises(ValueError, match=THREADS_VARIABLE):
        torch_threads(8, 2, {THREADS_VARIABLE: value})


def test_the_cores_are_those_the_process_may_run_on():
    assert available_cores() == len(os.sched_getaffinity(0)) >= 1


def test_a_worker_pool_process_sets_its_share(monkeypatch):
    """The pool size comes from the worker's controller (worker_init, before the fork), the cores from the affinity."""
    from workers import celery_app as worker_app

    monkeypatch.setattr(worker_app, "_controller", None)
    monkeypatch.setattr("fastif.threads.available_cores", lambda: 8)
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_app.pool_processes() == 1
    worker_app._keep_controller(sender=SimpleNamespace(concurrency=3))
    assert worker_app.pool_processes() == 3
    with single_thread():
        worker_app._limit_threads()
        assert torch.get_num_threads() == 2  # 8 cores // 3 processes
        monkeypatch.setenv(THREADS_VARIABLE, "1")
        worker_app._limit_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_VARIABLE, "lots")  # logged; a pool process that raised would be forked again
        worker_app._limit_threads()
        assert torch.get_num_threads() == 2
    worker_app._keep_controller(sender=SimpleNamespace(concurrency="auto"))  # not resolved: one process
    assert worker_app.pool_processes() == 1
