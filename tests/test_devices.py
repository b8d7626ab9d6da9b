"""One box, several devices: `kleinserve serve --devices cpu,cpu` starts one supervised `kleinserve worker`
process per device on the embedded SQLite store. A worker process SIGKILLed mid-job is restarted by
the supervisor, and the job completes (taken back at once: its worker's pid is gone). With
`--metrics-port` each worker process serves its own Prometheus metrics."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from fleet import EP, KEY, QUICK, SLOW, result, status, submit, wait_done, wait_progress
from kleinserve.service.store import open_store
from service_helpers import free_port, start_subprocess_server

pytestmark = pytest.mark.timeout(600)

# seconds long on one thread: still running when the test reads which process runs it
LONG = {**SLOW, "image_size": {"width": 768, "height": 768}, "num_inference_steps": 40}


def running_pid(store, base: str, rid: str) -> int:
    """The pid of the worker process running `rid` (read as soon as it has made progress)."""
    wait_progress(base, rid, 1)
    worker_id = store.get(rid).worker_id
    assert worker_id is not None, f"{rid} finished before its worker could be read"
    return int(worker_id.split(":")[1])


def live_workers(base: str) -> int:
    return httpx.get(base + "/ready", timeout=10).json().get("workers", {}).get(EP, 0)


def wait_workers(base: str, n: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while live_workers(base) < n:
        assert time.monotonic() < deadline, f"fewer than {n} workers"
        time.sleep(0.3)


def two_free_ports() -> int:
    """A free TCP port whose next one is free too."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def completed_ok(metrics_text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith('kleinserve_jobs_completed_total{error_type="",outcome="ok"}'))


def test_devices_cpu_cpu_runs_two_worker_processes_and_restarts_a_killed_one(tmp_path):
    data = tmp_path / "data"
    mport = two_free_ports()
    server = start_subprocess_server(["--devices", "cpu,cpu", "--model", "tiny", "--api-key", KEY,
                                      "--worker-stale-after", "6s", "--preview-every", "0",
                                      "--shutdown-grace", "0s", "--metrics-port", str(mport)],
                                     data_dir=data, timeout=240)
    store = open_store(f"sqlite:///{data / 'jobs.sqlite3'}")
    try:
        base = server.base_url
        wait_workers(base, 2)
        assert "one process per device: cpu, cpu" in server.log_text()
        # two jobs at once run on the two processes
        rids = [submit(base, LONG), submit(base, LONG)]
        pids = {running_pid(store, base, r) for r in rids}
        assert len(pids) == 2 and server.proc.pid not in pids
        wait_done([base], rids)
        # each process counts the job it ran on its own /metrics (the API's /metrics cannot: it ran none)
        worker_metrics = [httpx.get(f"http://127.0.0.1:{mport + i}/metrics", timeout=10).text for i in range(2)]
        assert [completed_ok(t) for t in worker_metrics] == [1.0, 1.0]
        assert all('kleinserve_model_info{' in t for t in worker_metrics)
        assert completed_ok(httpx.get(base + "/metrics", timeout=10).text) == 0.0
        # SIGKILL the process running a job: the supervisor restarts it; the job completes
        victim_rid = submit(base, LONG)
        victim = running_pid(store, base, victim_rid)
        import os

        os.kill(victim, signal.SIGKILL)
        done = wait_done([base], [victim_rid, submit(base, QUICK)])
        assert all(st["status"] == "COMPLETED" for st in done.values())
        job = store.get(victim_rid)
        assert job.error is None and job.attempts == 2
        assert result(base, victim_rid).status_code == 200
        deadline = time.monotonic() + 120
        while len(re.findall(r"started on cpu \(pid (\d+),", server.log_text())) < 3:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        assert "restarting in" in server.log_text()
        restarted = int(re.findall(r"started on cpu \(pid (\d+),", server.log_text())[2])
        # the restarted process serves: two jobs at once run on the two live processes, one of them it
        deadline = time.monotonic() + 240
        while True:
            pair = [submit(base, LONG), submit(base, LONG)]
            pids = {running_pid(store, base, r) for r in pair}
            wait_done([base], pair)
            if restarted in pids:
                break
            assert time.monotonic() < deadline, f"the restarted worker {restarted} never ran a job: {pids}"
        assert status(base, victim_rid)["status"] == "COMPLETED"
    finally:
        store.close()
        server.stop(60)
    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done
    assert server.proc.returncode in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "Application shutdown complete" in log
    children = [int(m) for m in re.findall(r"started on cpu \(pid (\d+),", log)]
    assert len(children) >= 3  # two, and the restarted one
    for pid in children:  # the supervisor stopped (and reaped) every worker process it started
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_metrics_port_is_checked_before_anything_starts():
    from kleinserve.service.settings import Settings

    with pytest.raises(ValueError, match="needs --devices"):
        Settings.from_sources({"metrics_port": 9400}, env={}, command="serve")
    with pytest.raises(ValueError, match="7999-8000, which must be free TCP ports other than --port 8000"):
        Settings.from_sources({"metrics_port": 7999, "devices": "cpu,cpu", "port": 8000}, env={}, command="serve")
    with pytest.raises(ValueError, match="TCP port"):
        Settings.from_sources({"metrics_port": 70000}, env={}, command="worker")
    assert Settings.from_sources({"metrics_port": 9400}, env={}, command="worker").metrics_port == 9400
    assert Settings.from_sources({"metrics_port": 9400, "devices": "cpu,cpu"}, env={}, command="serve").devices == \
        ["cpu", "cpu"]
