"""The reaper of records/inflight.py against a real Redis, on a clock of its own: which tasks of
which worker processes are sent again, when, and by how many reapers."""

from __future__ import annotations

import json

import redis

from records import inflight, keys
from records.heartbeat import beat


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reaper(client: redis.Redis, clock: Clock, sent: list) -> inflight.Reaper:
    return inflight.Reaper(client, lambda name, args, task_id: sent.append((name, args, task_id)), grace_s=25,
                           clock=clock)


def first_look(client: redis.Redis, *entries: tuple[str, str, str, list]) -> tuple[Clock, list, inflight.Reaper]:
    """Tasks (id, worker, boot, args) recorded as running, and a reaper that has looked once, at t = 0."""
    for task_id, worker, boot, args in entries:
        inflight.started(client, task_id, worker, boot, "fastif.influence", args)
    clock, sent = Clock(), []
    the_reaper = reaper(client, clock, sent)
    the_reaper.reap()
    return clock, sent, the_reaper


def test_a_dead_workers_tasks_are_sent_once_after_the_grace(redis_client: redis.Redis) -> None:
    clock, sent, other_sent = Clock(), [], []
    inflight.started(redis_client, "t-dead", "worker0@h", "boot-a", "fastif.influence", ["job-1"])
    inflight.started(redis_client, "t-live", "worker1@h", "boot-b", "fastif.stest_shard", ["job-2", 1])
    beat(redis_client, "worker1@h", {"boot": "boot-b"})
    first, second = reaper(redis_client, clock, sent), reaper(redis_client, clock, other_sent)
    for now in (0, 10, 24.9):  # missing at every look, but not yet for the grace
        clock.now = now
        assert first.reap() == [] and second.reap() == []
    clock.now = 25
    assert [t.task_id for t in first.reap()] == ["t-dead"]
    assert second.reap() == []  # claimed by the first: sent once
    assert sent == [("fastif.influence", ["job-1"], "t-dead")] and other_sent == []
    assert set(redis_client.hkeys(keys.INFLIGHT)) == {"t-live"}


def test_a_heartbeat_seen_again_within_the_grace_saves_the_worker(redis_client: redis.Redis) -> None:
    """After a Redis outage every heartbeat expired; live workers beat again within an interval."""
    clock, sent, the_reaper = first_look(redis_client, ("t-1", "worker0@h", "boot-a", ["job-1"]))
    clock.now = 10
    beat(redis_client, "worker0@h", {"boot": "boot-a"})
    the_reaper.reap()
    redis_client.delete(keys.worker("worker0@h"))  # missing again: the grace starts over
    for now in (20, 44.9):
        clock.now = now
        assert the_reaper.reap() == []
    clock.now = 45
    assert len(the_reaper.reap()) == 1 and sent == [("fastif.influence", ["job-1"], "t-1")]


def test_a_worker_restarted_under_the_same_name_is_another_process(redis_client: redis.Redis) -> None:
    beat(redis_client, "worker0@h", {"boot": "boot-new"})
    clock, _, the_reaper = first_look(redis_client, ("t-old", "worker0@h", "boot-old", ["job-1"]),
                                      ("t-new", "worker0@h", "boot-new", ["job-2"]))
    clock.now = 30
    assert [t.task_id for t in the_reaper.reap()] == ["t-old"]
    assert set(redis_client.hkeys(keys.INFLIGHT)) == {"t-new"}


def test_a_task_redelivered_elsewhere_is_not_sent_again(redis_client: redis.Redis, monkeypatch) -> None:
    """Between the look and the claim the task started on a live worker: the claim refuses it."""
    clock, sent, the_reaper = first_look(redis_client, ("t-1", "worker0@h", "boot-a", ["job-1"]))
    clock.now = 30
    original = inflight.in_flight

    def moved_meanwhile(client):
        tasks = original(client)
        inflight.started(redis_client, "t-1", "worker1@h", "boot-b", "fastif.influence", ["job-1"])
        return tasks

    monkeypatch.setattr(inflight, "in_flight", moved_meanwhile)
    assert the_reaper.reap() == [] and sent == []
    assert json.loads(redis_client.hget(keys.INFLIGHT, "t-1"))["worker"] == "worker1@h"


def test_finished_tasks_and_unreadable_entries_leave_nothing_to_reap(redis_client: redis.Redis) -> None:
    inflight.started(redis_client, "t-1", "worker0@h", "boot-a", "fastif.influence", ["job-1"])
    inflight.finished(redis_client, "t-1")
    redis_client.hset(keys.INFLIGHT, "t-garbage", "not json")
    assert inflight.in_flight(redis_client) == []
    assert redis_client.hlen(keys.INFLIGHT) == 0
