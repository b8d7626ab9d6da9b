#!/usr/bin/env python
"""Benchmark: the fleet shape (issue 9) on this machine. Two API replicas (`kleinserve serve --role api`)
and 1, 2, 4 worker processes (`kleinserve worker`, tiny model, one torch thread each) on a throwaway
PostgreSQL 15 cluster; the client spreads its requests over both replicas.

Measured:
- requests/s: `--requests` requests submitted at once (half to each replica), until every one is
  COMPLETED, for each worker count, and the speed-up over one worker;
- cross-process step-event latency: a client follows a request with the status stream of replica B
  (SSE `/stream` of the run API on B) while a worker process runs it; for each step, the time from the
  worker's commit of the progress event (the event row's created_at, the database clock of the same
  machine) to the client receiving it. p50/p99 over `--latency-requests` requests.

The processes share the machine's cores: on 2 cores, 4 workers plus 2 API replicas oversubscribe it,
so the ratios say how the fleet parts scale, not what a GPU fleet does.

    python benchmarks/bench_fleet.py --json benchmarks/results/fleet.json     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from fleet import EP, Fleet, H, submit, wait_done  # noqa: E402
from pg_server import PgCluster  # noqa: E402

# Compute-bound on the tiny model (~2 s single-threaded), as generations are on a GPU: the fleet's own
# overhead (HTTP, store, events) is then what the ratios expose. The client waits with one history
# query per poll, not a status poll per request.
BODY = {"prompt": "a lighthouse", "image_size": {"width": 768, "height": 768}, "num_inference_steps": 16,
        "enable_safety_checker": False}
LATENCY_BODY = {**BODY, "image_size": {"width": 192, "height": 192}, "num_inference_steps": 16}


def wait_all(base: str, rids: list[str], timeout: float = 1200.0) -> None:
    """Until every id is COMPLETED, with one history query per poll (per-id status polls would load
    the two cores the fleet itself runs on)."""
    pending, deadline = set(rids), time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} requests not completed"
        rows = httpx.get(f"{base}/api/requests", params={"limit": 200}, headers=H, timeout=30).json()["requests"]
        pending -= {r["request_id"] for r in rows if r["status"] == "COMPLETED"}
        time.sleep(0.25)


def throughput(cluster: PgCluster, workers: int, requests: int, root: Path) -> dict:
    db = cluster.create_database()
    fleet = Fleet(root / f"w{workers}", cluster.url(db))
    try:
        a, b = fleet.add_api("api-a"), fleet.add_api("api-b")
        for k in range(workers):
            fleet.add_worker(f"w{k}")
        fleet.wait_workers(workers)
        bases = [a.base_url, b.base_url]
        submit(a.base_url, BODY)  # warm: every worker's first run pays one-off costs
        wait_done(bases, [submit(b.base_url, BODY) for _ in range(workers)])
        t0 = time.perf_counter()
        rids = [submit(bases[i % 2], {**BODY, "seed": i}) for i in range(requests)]
        wait_all(a.base_url, rids)
        seconds = time.perf_counter() - t0
        return {"workers": workers, "requests": requests, "seconds": round(seconds, 2),
                "requests_per_s": round(requests / seconds, 3)}
    finally:
        fleet.stop()
        cluster.drop_database(db)


def event_latency(cluster: PgCluster, n_requests: int, root: Path) -> dict:
    db = cluster.create_database()
    url = cluster.url(db)
    fleet = Fleet(root / "latency", url)
    arrivals: list[tuple[str, int, float]] = []
    try:
        fleet.add_api("api-a")
        b = fleet.add_api("api-b")
        fleet.add_worker("w0")
        fleet.wait_workers(1)
        for _ in range(n_requests):
            with httpx.stream("POST", f"{b.base_url}/{EP}/stream", json=LATENCY_BODY, headers=H, timeout=300) as r:
                rid = r.headers["x-fal-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        ev = json.loads(line[5:])
                        if ev.get("step"):
                            arrivals.append((rid, int(ev["step"]), time.time()))
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT request_id, step, created_at FROM job_events "
                                "WHERE kind = 'progress'").fetchall()
    finally:
        fleet.stop()
        cluster.drop_database(db)
    committed = {(r[0], int(r[1])): float(r[2]) for r in rows}
    lat = sorted((t - committed[(rid, step)]) * 1000 for rid, step, t in arrivals if (rid, step) in committed)
    if not lat:
        return {"n": 0}
    return {"n": len(lat), "p50_ms": round(statistics.median(lat), 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2), "max_ms": round(lat[-1], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure (comma-separated)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--latency-requests", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    cluster = PgCluster()
    cluster.start()
    results: dict = {"throughput": [], "event_latency": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="ks-bench-fleet-") as tmp:
            root = Path(tmp)
            for n in counts:
                r = throughput(cluster, n, args.requests, root)
                results["throughput"].append(r)
                print(f"  {n} worker(s): {r['requests_per_s']:.3f} requests/s ({r['seconds']:.1f} s for "
                      f"{r['requests']})", flush=True)
            results["event_latency"] = event_latency(cluster, args.latency_requests, root)
    finally:
        cluster.destroy()
    base = results["throughput"][0]["requests_per_s"] if results["throughput"] else 0
    for r in results["throughput"]:
        r["speedup"] = round(r["requests_per_s"] / base, 2) if base else None
    print()
    print("| workers | requests/s | speed-up vs 1 |")
    print("|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['workers']} | {r['requests_per_s']:.3f} | {r['speedup']:.2f}x |")
    lat = results["event_latency"]
    if lat.get("n"):
        print(f"\ncross-process step-event latency (worker commit -> SSE client on the other replica): "
              f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms over {lat['n']} steps")
    out = C.write_json("fleet", {"benchmark": "fleet", "environment": C.environment(), **results},
                       str(args.json) if args.json else None)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
