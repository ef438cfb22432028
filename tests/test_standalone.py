"""``fastif standalone``: embedded Redis, a worker and the API in one foreground command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fastif_cli.stack import free_port
from live_stack import make_data_root, wait_for

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def test_standalone_serves_a_job_and_stops_cleanly(tmp_path):
    root = make_data_root(tmp_path / "data")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # the embedded Redis, then
    env["FASTIF_DATA_ROOT"] = str(root)
    proc = subprocess.Popen([sys.executable, "-m", "fastif_cli.main", "standalone", "--port", str(port),
                             "--workers", "1"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        while "ready at" not in banner:
            assert proc.poll() is None and banner, "standalone exited before it was ready"
            banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}" in banner and "redis://127.0.0.1:" in banner
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            created = client.post("/v1/models", json={"name": "t", "model_path": "model",
                                                      "train_data": {"path": "train.jsonl"}}).json()
            wait_for(lambda: client.get(f"/v1/models/{created['id']}").json(),
                     lambda m: m["status"] == "ready", timeout_s=120)
            job = client.post("/v1/influence", json={
                "model_id": created["id"], "inputs": [{"text": "a lovely film"}], "k": 10, "top": 3,
                "lissa": {"depth": 50, "scale": 1000, "damp": 0.01}}).json()
            done = wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json(),
                            lambda j: j["status"] in ("succeeded", "failed"), timeout_s=120)
            assert done["status"] == "succeeded", done["error"]
            items = client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
            assert items[0]["helpful"] or items[0]["harmful"]
        children = descendants(proc.pid)
        assert len(children) >= 3  # redis, worker (+ its pool), api
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)], "orphan processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


def start_standalone(root: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(FASTIF_DATA_ROOT=str(root), FASTIF_HEARTBEAT_INTERVAL_S="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastif_cli.main", "standalone", "--port", str(port),
                             "--workers", "1", *extra], env=env, stderr=subprocess.PIPE, text=True)
    banner = proc.stderr.readline()
    while "ready at" not in banner:
        assert proc.poll() is None and banner, "standalone exited before it was ready"
        banner = proc.stderr.readline()
    proc.banner = banner  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0


def test_standalone_keeps_models_jobs_and_results_across_a_restart(tmp_path):
    root = make_data_root(tmp_path / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_standalone(root, port)
    try:
        assert f"state kept in {root / '.fastif' / 'redis'}" in proc.banner
        with httpx.Client(base_url=url, timeout=30) as client:
            model = client.post("/v1/models", json={"name": "kept", "model_path": "model",
                                                    "train_data": {"path": "train.jsonl"}}).json()
            wait_for(lambda: client.get(f"/v1/models/{model['id']}").json(), lambda m: m["status"] == "ready",
                     timeout_s=120)
            quick = client.post("/v1/influence", json={"model_id": model["id"], "inputs": [{"text": "a lovely film"}],
                                                       "k": 10, "top": 3, "solver": "lissa",
                                                       "lissa": {"depth": 50, "scale": 1000, "damp": 0.01}}).json()
            wait_for(lambda: client.get(f"/v1/jobs/{quick['id']}").json(), lambda j: j["status"] == "succeeded",
                     timeout_s=120)
            before = client.get(f"/v1/jobs/{quick['id']}/results").json()["items"]
            # Running when the stack stops: its worker is stopped under it.
            long = client.post("/v1/influence", json={"model_id": model["id"], "inputs": [{"text": "a dull film"}],
                                                      "k": 10, "top": 3, "solver": "lissa",
                                                      "lissa": {"depth": 1500, "scale": 1000, "damp": 0.01}}).json()
            wait_for(lambda: client.get(f"/v1/jobs/{long['id']}").json(),
                     lambda j: j["status"] == "running" and j["progress"]["done"] > 0, timeout_s=120)
        stop(proc)

        proc = start_standalone(root, port)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get(f"/v1/models/{model['id']}").json()["status"] == "ready"  # not built again
            assert client.get(f"/v1/jobs/{quick['id']}/results").json()["items"] == before
            assert quick["id"] in [j["id"] for j in client.get("/v1/jobs").json()["items"]]
            ended = wait_for(lambda: client.get(f"/v1/jobs/{long['id']}").json(),
                             lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout_s=180)
            # Sent again by the reaper (its worker died with the stack) and finished; never left running.
            assert ended["status"] == "succeeded" and ended["deliveries"] == 2, ended
        stop(proc)

        proc = start_standalone(root, port, "--ephemeral")
        assert "keeping nothing" in proc.banner
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v1/models").json()["items"] == []  # an empty Redis of its own
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
