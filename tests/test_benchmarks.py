"""The benchmark scripts stay runnable: each runs end to end on the tiny model (tiny settings) and writes
its JSON. These check that the scripts work, not the figures (those are BENCHMARKS.md's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_benchmark_smoke_run_covers_every_configuration(tmp_path):
    out = tmp_path / "gpu.json"
    run_script("bench_gpu.py", "--tiny", "--batching", "--json", str(out))
    result = json.loads(out.read_text())
    assert [row["config"].split()[0] for row in result["rows"]] == ["diffusers", "engine", "engine", "engine"]
    assert [b["requests_per_run"] for b in result["extra"]["batching"]] == [1, 2, 4]
    assert all(row["s_per_image"] > 0 for row in result["rows"])
    assert result["quality"]["regular"]["psnr_vs_none"] > 60  # lossless level: same image


def test_service_benchmark_smoke_run_measures_both_worker_modes(tmp_path):
    out = tmp_path / "service.json"
    run_script("bench_service.py", "--sequential", "2", "--stream", "1", "--burst", "6", "--clients", "3",
               "--api-requests", "12", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    for mode in ("throughput", "throughput_batched"):
        assert results[mode]["requests"] == 6 and results[mode]["req_per_s"] > 0
    assert results["sse"]["step_event_latency"]["p50"] >= 0


def test_store_benchmark_smoke_run_measures_both_backends(tmp_path):
    import pg_server

    pg_server.require_postgres()
    out = tmp_path / "store.json"
    run_script("bench_store.py", "--submits", "20", "--jobs", "40", "--procs", "2", "--events", "10",
               "--json", str(out))
    results = json.loads(out.read_text())["results"]
    for backend in ("sqlite", "postgres"):
        r = results[backend]
        assert r["submit"]["n"] == 20 and r["submit"]["p50"] > 0
        assert [c["procs"] for c in r["claims"]] == [1, 2] and all(c["per_s"] > 0 for c in r["claims"])
        assert r["event_latency"]["n"] >= 10
        assert r["progress_write"]["n"] == 10 and r["progress_write"]["p50"] > 0


def test_reliability_benchmark_smoke_run(tmp_path):
    out = tmp_path / "reliability.json"
    run_script("bench_reliability.py", "--no-webhooks", "--submits", "12", "--clients", "4", "--races", "3",
               "--json", str(out))
    results = json.loads(out.read_text())
    assert results["request_ids"]["json_404"] == results["request_ids"]["requests"]
    assert results["ssrf_at_submit"]["refused_422"] == results["ssrf_at_submit"]["webhook_urls"]
    assert results["graceful_shutdown"]["sync_run"]["status"] == 503
    assert results["cancel_race"]["ended"] == {"cancelled": 3}


def test_load_benchmark_smoke_run(tmp_path):
    out = tmp_path / "load.json"
    run_script("bench_load.py", "--clients", "5", "--submits", "20", "--rounds", "1", "--interval", "0.2",
               "--only", "submit_paced", "--only", "history", "--only", "soak",
               "--queued", "30", "--history-reads", "2", "--soak", "60", "--warmup", "20", "--gaps", "0",
               "--json", str(out))
    results = json.loads(out.read_text())["this"]
    assert results["submit_paced"]["rounds"][0]["statuses"] == {"200": 20}
    assert results["submit_paced"]["latency"]["n"] == 20
    assert results["history"]["page_rows"] == 30 and results["history"]["positions"] == [29, 0]
    assert results["soak"]["server_errors"] == {} and results["soak"]["rss_mb"]["end"] > 0
