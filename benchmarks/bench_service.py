#!/usr/bin/env python
"""Benchmark 2: what the service adds on top of the engine (tiny model, CPU, one process).

The app runs under uvicorn on 127.0.0.1 (a real TCP server, tests/service_helpers.serve_app) with the
tiny engine wrapped so that the time of each `generate` call and of each step callback are recorded.

Measured:
- bare engine: `engine.generate(request)` called directly (no service), p50/p99;
- queue round trip, one request at a time: submit -> status stream until COMPLETED -> GET result.
  Bare calls and round trips alternate; overhead = round trip - the bare call before it (everything
  the service adds: HTTP, queue store, worker hand-off, step logs, previews, image storage, events), and
  round trip - the same request's own `generate` time inside the worker (what is outside the engine call);
- SSE (`POST /<id>/stream`): time to the first event, and step-event latency = client receive time -
  time the engine reported the step (same clock: one process);
- throughput: several client threads each submit and wait on the status stream (always `clients`
  requests in flight), completed requests per second vs the engine-bound rate 1 / bare p50; and the API
  alone (no engine) for submits and status reads per second.

    python benchmarks/bench_service.py              # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

EP = "fal-ai/flux-2/klein/9b/base"
KEY = "bench-key"
HEADERS = {"Authorization": f"Key {KEY}"}
PROMPT = "a red fox in the snow"  # one prompt: after the first request it comes from the embedding cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side (tiny model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sequential", type=int, default=20, help="queue round trips, one at a time")
    p.add_argument("--stream", type=int, default=10, help="SSE /stream requests")
    p.add_argument("--burst", type=int, default=40, help="requests submitted at once (throughput)")
    p.add_argument("--clients", type=int, default=8, help="client threads")
    p.add_argument("--batch-images", type=int, default=4,
                   help="throughput again with the worker batching queued requests up to this many images")
    p.add_argument("--api-requests", type=int, default=400, help="submits and status reads (API alone)")
    p.add_argument("--json", help="output path (default benchmarks/results/service.json)")
    return p.parse_args(argv)


class TimedEngine:
    """Delegates to the engine; records generate() wall time and when each step was reported."""

    def __init__(self, engine):
        self._engine = engine
        self.generate_seconds: dict[str, float] = {}  # prompt -> seconds
        self.step_times: dict[tuple[str, int], float] = {}  # (prompt, step) -> perf_counter
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, tasks, **kw):
        """What the worker calls (a batch of one unless --batch-images lets requests share a run)."""
        timed_tasks = []
        for task in tasks:
            def timed_step(ev, prompt=task.request.prompt, inner=task.on_step):
                with self._lock:
                    self.step_times[(prompt, int(ev.step))] = time.perf_counter()
                if inner is not None:
                    inner(ev)

            timed_tasks.append(dataclasses.replace(task, on_step=timed_step))
        t0 = time.perf_counter()
        try:
            return self._engine.generate_batch(timed_tasks, **kw)
        finally:
            with self._lock:
                for task in tasks:
                    self.generate_seconds[task.request.prompt] = time.perf_counter() - t0


def sse_events(response):
    """Yield (receive time, JSON object) for each SSE `data:` line of an httpx streaming response."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield time.perf_counter(), json.loads(line[5:].strip())


def body(args, prompt: str) -> dict:
    return {"prompt": prompt, "image_size": {"width": args.size, "height": args.size},
            "num_inference_steps": args.steps, "seed": 1, "enable_safety_checker": False}


def throughput(http, args, bare_p50: float) -> dict:
    """`args.clients` client threads each submit and wait on the status stream (no polling load), so
    that many requests are in flight at all times, `args.burst` in all. Requests/s and per-request latency."""
    latencies: list[float] = []

    def submit_and_wait(i):
        t0 = time.perf_counter()
        r = http.post(f"/queue/{EP}", json=body(args, PROMPT))
        r.raise_for_status()
        with http.stream("GET", r.json()["status_url"] + "/stream") as st:
            for _, ev in sse_events(st):
                if ev.get("status") == "COMPLETED":
                    break
        http.get(r.json()["response_url"]).raise_for_status()
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(submit_and_wait, range(args.burst)))
    elapsed = time.perf_counter() - t0
    return {"requests": args.burst, "seconds": elapsed, "req_per_s": args.burst / elapsed,
            "engine_bound_req_per_s": 1 / bare_p50, "efficiency": (args.burst / elapsed) * bare_p50,
            "latency": C.summarize(latencies)}


def main(argv=None) -> int:
    args = parse_args(argv)
    C.quiet_logs()
    import httpx

    from kleinserve.api.app import create_app
    from kleinserve.engine import load_engine
    from kleinserve.schema import FluxKleinInput
    from kleinserve.service.settings import Settings
    from service_helpers import serve_app

    env = C.environment()
    t_start = time.perf_counter()
    engine = load_engine("tiny", device="cpu", dtype="float32")
    timed = TimedEngine(engine)

    def bare_once() -> float:
        request = FluxKleinInput(**body(args, PROMPT))
        t0 = time.perf_counter()
        engine.generate(request)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (first-call overheads; fills the embedding cache)
        bare_once()

    tmp = tempfile.TemporaryDirectory(prefix="kleinserve-bench-service-")
    settings = Settings(data_dir=Path(tmp.name) / "data", api_keys=[KEY])
    app = create_app(settings, engine=timed)
    results: dict = {}
    with serve_app(app) as server, httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=120) as http:
        def round_trip(prompt: str) -> dict:
            t0 = time.perf_counter()
            sub = http.post(f"/queue/{EP}", json=body(args, prompt))
            sub.raise_for_status()
            sub = sub.json()
            t_submitted = time.perf_counter()
            with http.stream("GET", sub["status_url"] + "/stream") as r:
                for _, ev in sse_events(r):
                    if ev.get("status") == "COMPLETED":
                        break
            t_completed = time.perf_counter()
            res = http.get(sub["response_url"])
            res.raise_for_status()
            t1 = time.perf_counter()
            return {"e2e": t1 - t0, "submit": t_submitted - t0, "to_completed": t_completed - t0,
                    "inner": timed.generate_seconds[prompt], "engine_total": res.json()["timings"]["total"]}

        round_trip(PROMPT)  # warm-up through the service
        # Bare engine calls and round trips alternate, so a load change on the machine hits both alike;
        # overhead_i = round trip i - the bare call just before it.
        bare, seq = [], []
        for _ in range(args.sequential):
            bare.append(bare_once())
            seq.append(round_trip(PROMPT))
        bare_p50 = C.summarize(bare)["p50"]
        e2e = [r["e2e"] for r in seq]
        results["sequential"] = {
            "e2e": C.summarize(e2e),
            "overhead_vs_bare": C.summarize([r["e2e"] - b for r, b in zip(seq, bare, strict=True)]),
            "outside_generate": C.summarize([r["e2e"] - r["inner"] for r in seq]),
            "submit": C.summarize([r["submit"] for r in seq]),
            "inner_generate": C.summarize([r["inner"] for r in seq]),
        }
        print(f"bare engine p50 {bare_p50 * 1000:.1f} ms; queue round trip p50 "
              f"{results['sequential']['e2e']['p50'] * 1000:.1f} ms", flush=True)

        # ---- SSE /stream: first event, step events
        first, step_lat, stream_e2e = [], [], []
        for _ in range(args.stream):
            prompt = PROMPT
            timed.step_times.clear()
            t0 = time.perf_counter()
            received = []
            with http.stream("POST", f"/{EP}/stream", json=body(args, prompt)) as r:
                r.raise_for_status()
                for t, ev in sse_events(r):
                    received.append((t, ev))
            stream_e2e.append(time.perf_counter() - t0)
            first.append(received[0][0] - t0)
            for t, ev in received:
                step = ev.get("step")
                if isinstance(step, int) and step > 0 and (prompt, step) in timed.step_times:
                    step_lat.append(t - timed.step_times[(prompt, step)])
        results["sse"] = {"first_event": C.summarize(first), "step_event_latency": C.summarize(step_lat),
                          "stream_e2e": C.summarize(stream_e2e)}
        print(f"SSE: first event p50 {results['sse']['first_event']['p50'] * 1000:.1f} ms, step events "
              f"p50 {results['sse']['step_event_latency']['p50'] * 1000:.2f} ms ({len(step_lat)})", flush=True)

        results["throughput"] = throughput(http, args, bare_p50)
        print(f"throughput: {results['throughput']['req_per_s']:.2f} req/s (engine bound {1 / bare_p50:.2f})",
              flush=True)

    # ---- the same burst with the worker batching queued requests (--batch-images)
    settings_b = Settings(data_dir=Path(tmp.name) / "data-batched", api_keys=[KEY], batch_images=args.batch_images)
    with serve_app(create_app(settings_b, engine=timed)) as server, \
            httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=120) as http:
        results["throughput_batched"] = throughput(http, args, bare_p50)
    print(f"throughput with --batch-images {args.batch_images}: "
          f"{results['throughput_batched']['req_per_s']:.2f} req/s", flush=True)

    # ---- the API alone: no engine, nothing runs; submits and status reads per second
    settings2 = Settings(data_dir=Path(tmp.name) / "data2", api_keys=[KEY])
    app2 = create_app(settings2, engine=None, start_worker=False)
    with serve_app(app2) as server, ThreadPoolExecutor(args.clients) as pool:
        local = threading.local()

        def client():
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60)
            return local.c

        def submit(i):
            r = client().post(f"/queue/{EP}", json=body(args, f"api {i}"))
            r.raise_for_status()
            return r.json()["status_url"]

        list(pool.map(submit, range(args.clients)))  # warm
        t0 = time.perf_counter()
        urls = list(pool.map(submit, range(args.api_requests)))
        submit_rate = args.api_requests / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        list(pool.map(lambda u: client().get(u).raise_for_status(), urls))
        status_rate = args.api_requests / (time.perf_counter() - t0)
    results["api_only"] = {"submit_per_s": submit_rate, "status_per_s": status_rate,
                           "requests": args.api_requests, "clients": args.clients}
    tmp.cleanup()

    seq, sse = results["sequential"], results["sse"]
    ms = 1000.0
    rows = [
        {"what": "bare engine generate (tiny)", "p50": bare_p50 * ms, "p99": C.summarize(bare)["p99"] * ms},
        {"what": "queue round trip (submit -> stream COMPLETED -> result)", "p50": seq["e2e"]["p50"] * ms,
         "p99": seq["e2e"]["p99"] * ms},
        {"what": "service overhead = round trip - bare engine (paired)", "p50": seq["overhead_vs_bare"]["p50"] * ms,
         "p99": seq["overhead_vs_bare"]["p99"] * ms},
        {"what": "  of which outside the worker's generate call", "p50": seq["outside_generate"]["p50"] * ms,
         "p99": seq["outside_generate"]["p99"] * ms},
        {"what": "  submit (POST until response)", "p50": seq["submit"]["p50"] * ms, "p99": seq["submit"]["p99"] * ms},
        {"what": "SSE /stream: first event", "p50": sse["first_event"]["p50"] * ms,
         "p99": sse["first_event"]["p99"] * ms},
        {"what": "SSE /stream: step event latency", "p50": sse["step_event_latency"]["p50"] * ms,
         "p99": sse["step_event_latency"]["p99"] * ms},
    ]
    title = (f"Service overhead: tiny model, {args.size}x{args.size}, {args.steps} steps, CPU; "
             f"{args.sequential} sequential round trips, {args.stream} streams (milliseconds)")
    table = C.print_table(title, rows, [("what", "measure", ""), ("p50", "p50 ms", ".1f"), ("p99", "p99 ms", ".1f")])
    tp, tpb, api = results["throughput"], results["throughput_batched"], results["api_only"]
    rows2 = [
        {"what": f"completed requests/s, {tp['requests']} requests, {args.clients} in flight",
         "value": tp["req_per_s"]},
        {"what": "  latency p50 / p99 (s)", "value": f"{tp['latency']['p50']:.3f} / {tp['latency']['p99']:.3f}"},
        {"what": f"  same with --batch-images {args.batch_images}: requests/s", "value": tpb["req_per_s"]},
        {"what": "  latency p50 / p99 (s)", "value": f"{tpb['latency']['p50']:.3f} / {tpb['latency']['p99']:.3f}"},
        {"what": "  batching gain (requests/s ratio)", "value": tpb["req_per_s"] / tp["req_per_s"]},
        {"what": "engine-bound requests/s (1 / bare p50)", "value": tp["engine_bound_req_per_s"]},
        {"what": "efficiency (achieved / engine-bound)", "value": tp["efficiency"]},
        {"what": f"API alone: submits/s ({args.clients} clients, no engine)", "value": api["submit_per_s"]},
        {"what": f"API alone: status reads/s ({args.clients} clients)", "value": api["status_per_s"]},
    ]
    table += "\n" + C.print_table("Throughput", rows2, [("what", "measure", ""), ("value", "value", ".3g")])
    payload = {"benchmark": "service", "environment": env, "settings": vars(args), "bare_engine": C.summarize(bare),
               "results": results, "table": table, "wall_seconds": time.perf_counter() - t_start}
    path = C.write_json("service", payload, args.json)
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
