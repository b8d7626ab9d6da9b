#!/usr/bin/env python
"""Benchmark: the job stores alone (no model, no HTTP), SQLite and PostgreSQL.

Measured per backend:
- durable submit latency: one `submit` at a time (committed and synced before it returns), p50/p99;
- claims/s: `--jobs` queued jobs claimed by 1 and by `--procs` worker PROCESSES (each its own store,
  claim_next in a loop until the queue is empty; SQLite: BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE SKIP
  LOCKED), and claim + complete_ok/s by the same processes;
- event latency: a progress event committed by one store object until another store object's
  `wait_events` returns it (SQLite: the other's 20 ms poll; PostgreSQL: NOTIFY to its LISTEN thread);
  the two objects share nothing but the database, as two processes would.

PostgreSQL is a throwaway 15 cluster started from /usr/lib/postgresql/15/bin (tests/pg_server.py), or
the server given with --pg-url (an empty database: the script creates its tables).

    python benchmarks/bench_store.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

from kleinserve.service import jobs as J  # noqa: E402
from kleinserve.service.store import Lease, open_store  # noqa: E402

EP = "fal-ai/flux-2/klein/9b/base"


def new_job(i: int = 0) -> J.Job:
    return J.Job(request_id=J.new_request_id(), endpoint_id=EP, owner=f"k_{i % 4}",
                 input={"prompt": "a benchmark", "seed": i, "image_size": "square"})


def _claimer(url: str, complete: bool, start, out_q) -> None:
    store = open_store(url)
    start.wait()
    n = 0
    t0 = time.perf_counter()
    while True:
        job = store.claim_next(f"bench-{mp.current_process().pid}")
        if job is None:
            break
        if complete:
            store.complete_ok(Lease.of(job), {"images": []})
        n += 1
    out_q.put((n, time.perf_counter() - t0))
    store.close()


def measure_claims(url: str, jobs: int, procs: int, complete: bool) -> dict:
    store = open_store(url)
    for i in range(jobs):
        store.submit(new_job(i))
    queued = store.queued_count()  # with what earlier measurements left queued
    ctx = mp.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_claimer, args=(url, complete, start, q)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(1.0 + 0.3 * procs)  # let every process open its store before the clock starts
    t0 = time.perf_counter()
    start.set()
    results = [q.get(timeout=600) for _ in workers]
    elapsed = time.perf_counter() - t0
    for w in workers:
        w.join(60)
    claimed = sum(n for n, _ in results)
    assert claimed == queued, f"claimed {claimed} of {queued}"
    assert store.queue_depth()[J.IN_QUEUE] == 0
    store.close()
    return {"jobs": claimed, "procs": procs, "complete": complete, "seconds": elapsed, "per_s": claimed / elapsed}


def measure_submits(url: str, n: int) -> dict:
    store = open_store(url)
    samples = []
    for i in range(n):
        job = new_job(i)
        t = time.perf_counter()
        store.submit(job)
        samples.append(time.perf_counter() - t)
    store.close()
    return C.summarize(samples)


def measure_event_latency(url: str, n: int) -> tuple[dict, dict]:
    """(step event latency from the writer's commit to another connection's reader, the time of one
    `record_progress` call: what a denoising step paid before the worker wrote progress on a thread
    of its own)."""
    writer, reader = open_store(url), open_store(url)
    job = writer.submit(new_job())
    lease = Lease.of(writer.claim_next("bench-writer"))
    cursor = reader.last_event_seq()
    reader.wait_events(cursor, 0.1)  # starts the reader's listener (PostgreSQL)
    received: dict[int, float] = {}  # step -> when the reader got it
    committed: dict[int, float] = {}  # step -> when record_progress returned (committed)
    writes: list[float] = []

    def read():
        nonlocal cursor
        deadline = time.monotonic() + 120
        while len(received) < n and time.monotonic() < deadline:
            events = reader.wait_events(cursor, 5.0)
            now = time.perf_counter()
            for e in events:
                if e.request_id == job.request_id and e.step > 0:
                    received[e.step] = now
            if events:
                cursor = events[-1].seq

    t = threading.Thread(target=read)
    t.start()
    for step in range(1, n + 1):
        t0 = time.perf_counter()
        writer.record_progress(lease, step, n)
        committed[step] = time.perf_counter()
        writes.append(committed[step] - t0)
        time.sleep(0.01)
    t.join(150)
    # A reader may see the event before the writer's call returns: count that as 0.
    samples = [max(0.0, received[s] - committed[s]) for s in committed if s in received]
    writer.close()
    reader.close()
    return C.summarize(samples), C.summarize(writes)


def run_backend(name: str, url: str, args) -> dict:
    print(f"{name}: {url}", flush=True)
    out = {"url": url if name == "sqlite" else url.split("@")[-1]}
    out["submit"] = measure_submits(url, args.submits)
    out["claims"] = [measure_claims(url, args.jobs, p, complete=False) for p in (1, args.procs)]
    out["claim_complete"] = [measure_claims(url, args.jobs, p, complete=True) for p in (1, args.procs)]
    out["event_latency"], out["progress_write"] = measure_event_latency(url, args.events)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs claimed per claims measurement")
    parser.add_argument("--procs", type=int, default=4, help="worker processes claiming at once")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--pg-url", help="an existing PostgreSQL database instead of a throwaway cluster")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--json", help="output path (default benchmarks/results/store.json)")
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        results["sqlite"] = run_backend("sqlite", f"sqlite://{tmp}/jobs.sqlite3", args)
    if not args.no_postgres:
        cluster = None
        url = args.pg_url
        if url is None:
            import pg_server

            reason = pg_server.missing_reason()
            if reason:
                sys.exit(f"bench_store: {reason} (or pass --pg-url, or --no-postgres)")
            cluster = pg_server.PgCluster()
            cluster.start()
            url = cluster.url(cluster.create_database())
        try:
            results["postgres"] = run_backend("postgres", url, args)
        finally:
            if cluster is not None:
                cluster.destroy()

    ms = 1000.0
    rows = []
    for name, r in results.items():
        rows.append({
            "backend": name,
            "submit_p50": r["submit"]["p50"] * ms, "submit_p99": r["submit"]["p99"] * ms,
            "claims_1": r["claims"][0]["per_s"], "claims_n": r["claims"][1]["per_s"],
            "cc_1": r["claim_complete"][0]["per_s"], "cc_n": r["claim_complete"][1]["per_s"],
            "ev_p50": r["event_latency"]["p50"] * ms, "ev_p99": r["event_latency"]["p99"] * ms,
            "pw_p50": r["progress_write"]["p50"] * ms, "pw_p99": r["progress_write"]["p99"] * ms,
        })
    n = args.procs
    table = C.print_table(
        f"Job store ({args.jobs} jobs per claim run; {n} = worker processes)", rows,
        [("backend", "store", ""), ("submit_p50", "durable submit p50 ms", ".2f"),
         ("submit_p99", "submit p99 ms", ".2f"), ("claims_1", "claims/s 1 proc", ".0f"),
         ("claims_n", f"claims/s {n} procs", ".0f"), ("cc_1", "claim+complete/s 1 proc", ".0f"),
         ("cc_n", f"claim+complete/s {n} procs", ".0f"), ("ev_p50", "event latency p50 ms", ".1f"),
         ("ev_p99", "event p99 ms", ".1f"), ("pw_p50", "progress write p50 ms", ".2f"),
         ("pw_p99", "progress write p99 ms", ".2f")])
    payload = {"benchmark": "store", "environment": C.environment(), "settings": vars(args), "results": results,
               "table": table}
    path = C.write_json("store", payload, args.json)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
