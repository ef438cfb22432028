"""Tasks in flight, so that the tasks of a worker that died whole are sent again.

Celery requeues the task of a pool process that died (`task_reject_on_worker_lost`), but when
the whole worker dies (SIGKILL, a lost machine) its unacknowledged message stays with the Redis
broker until the visibility timeout (FASTIF_VISIBILITY_TIMEOUT_S, hours, since it must outlast
the longest job): the job would sit `running` all that time. So each task says where it runs in
`fastif:inflight` (task id -> worker, boot id, name, args) while it runs, and every worker's heartbeat
thread reaps the tasks of worker processes whose heartbeat has been gone for a while (or beats with
another boot id: the worker was restarted under the same name): it claims each task
atomically (one reaper wins) and sends it again under the same task id. The job's delivery
counter then bounds how often a job is retried, as for any redelivery. When the broker's own
copy comes back after the visibility timeout, the job is long finished and that delivery is
skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from . import keys
from ._codec import text

# Delete a task's entry only if it still names the dead worker process (a redelivery may have moved it).
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry['worker'] ~= ARGV[2] or entry['boot'] ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class InflightTask:
    task_id: str
    worker: str  # the worker's hostname, as in its heartbeat key
    boot: str  # the id the worker process drew when it started (in its heartbeat too)
    name: str
    args: list


def started(client: redis.Redis, task_id: str, worker: str, boot: str, name: str, args: list) -> None:
    """Record that worker process (`worker`, `boot`) runs the task now (a redelivery overwrites it)."""
    client.hset(keys.INFLIGHT, task_id, json.dumps({"worker": worker, "boot": boot, "name": name,
                                                    "args": list(args), "ts": time.time()}))


def finished(client: redis.Redis, task_id: str) -> None:
    """The task returned, or handed itself back for a retry: nothing to reap."""
    client.hdel(keys.INFLIGHT, task_id)


def in_flight(client: redis.Redis) -> list[InflightTask]:
    """Every task recorded as running."""
    tasks = []
    for task_id, raw in client.hgetall(keys.INFLIGHT).items():
        try:
            entry = json.loads(text(raw) or "")
            tasks.append(InflightTask(text(task_id) or "", entry["worker"], entry["boot"], entry["name"],
                                      entry["args"]))
        except (ValueError, KeyError, TypeError):
            client.hdel(keys.INFLIGHT, task_id)  # unreadable: nothing could ever resend it
    return tasks


@dataclass
class Reaper:
    """Sends again the tasks of worker processes that have been without a heartbeat for `grace_s`.

    A worker process is judged dead only when its heartbeat (same hostname, same boot id) is
    missing at every look over `grace_s`, which spans more than two heartbeat intervals: after a
    Redis outage that let every heartbeat expire, live workers beat again within one interval,
    so their tasks do not run twice.
    """

    client: redis.Redis
    send: Callable[[str, list, str], None]  # (task name, args, task id)
    grace_s: float = 25.0
    clock: Callable[[], float] = time.monotonic
    _missing_since: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._claim = self.client.register_script(_CLAIM)

    def reap(self) -> list[InflightTask]:
        """One pass: the tasks this reaper sent again."""
        tasks = in_flight(self.client)
        processes = sorted({(task.worker, task.boot) for task in tasks})
        alive = self._alive(processes)
        now = self.clock()
        self._missing_since = {process: self._missing_since.get(process, now)
                               for process in processes if process not in alive}
        sent = []
        for task in tasks:
            since = self._missing_since.get((task.worker, task.boot))
            if since is None or now - since < self.grace_s:
                continue
            if self._claim(keys=[keys.INFLIGHT], args=[task.task_id, task.worker, task.boot]):
                self.send(task.name, task.args, task.task_id)
                sent.append(task)
        return sent

    def _alive(self, processes: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The worker processes whose heartbeat is there now, under the boot id they recorded."""
        if not processes:
            return set()
        alive = set()
        for process, raw in zip(processes, self.client.mget([keys.worker(w) for w, _ in processes]), strict=True):
            try:
                if raw is not None and json.loads(text(raw) or "").get("boot") == process[1]:
                    alive.add(process)
            except ValueError:
                continue
        return alive
