#!/usr/bin/env python
"""Reliability and security checks of issue 10, as figures (RELIABILITY.md): a hostile and a heavy
user against a real server on 127.0.0.1 (uvicorn in this process, no model: requests stay queued).
Every loop is bounded; nothing leaves the machine.

    python benchmarks/bench_reliability.py                      # ~2 min, prints a table
    python benchmarks/bench_reliability.py --json out.json --no-webhooks

It talks HTTP only (plus the job store for the cancel race), so the same script measures an older
checkout: run it from that checkout's benchmarks/ folder.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout
sys.path.insert(0, str(HERE))

import uvicorn  # noqa: E402

from kleinserve.api.app import create_app  # noqa: E402
from kleinserve.service.settings import Settings  # noqa: E402

EP = "fal-ai/flux-2/klein/9b/base"
KA, KB = "reliability-key-a", "reliability-key-b"
A = {"Authorization": f"Key {KA}"}
B = {"Authorization": f"Key {KB}"}
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn on 127.0.0.1 in a thread, built the way `kleinserve serve` builds it when possible."""

    def __init__(self, data_dir: Path, **values):
        self.settings = Settings.from_sources({"data_dir": data_dir, "api_keys": [KA, KB], **values}, env={})
        from kleinserve.service.sqlite_store import SQLiteJobStore

        # Our own store: it stays open after the server stopped, to read what became of the requests.
        self.store = SQLiteJobStore(Path(data_dir) / "jobs.sqlite3")
        from kleinserve.endpoints import default_registry
        from kleinserve.service.runtime import build_services

        self.app = create_app(services=build_services(self.settings, default_registry(), store=self.store))
        self.port = _free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                lifespan="on", timeout_graceful_shutdown=5)
        try:
            from kleinserve.api.server import GracefulServer  # issue 10: tells the app about SIGTERM
        except ImportError:
            GracefulServer = uvicorn.Server  # noqa: N806 - an older checkout
        self.server = GracefulServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def sigterm(self) -> None:
        """What a SIGTERM does (uvicorn's handler; in a thread no real signal can be delivered)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        try:
            from sse_starlette.sse import AppStatus

            AppStatus.should_exit = False
        except ImportError:
            pass


def _tally(responses) -> dict:
    return dict(sorted(Counter(str(r) for r in responses).items()))


# ---------------------------------------------------------------------------------------------- checks

BAD_IDS = ["%E2%82%AC", "abc%0D%0AINFO%20forged", "not-a-uuid", "x" * 300, "%00", "..%5C..%5Cetc"]


def request_ids(srv: Server) -> dict:
    out, json404 = [], 0
    with httpx.Client(base_url=srv.base, headers=A, timeout=10) as c:
        for rid in BAD_IDS:
            q = f"/queue/fal-ai/flux-2/requests/{rid}"
            for method, path in [("GET", q + "/status"), ("GET", q), ("PUT", q + "/cancel"),
                                 ("GET", q + "/status/stream"), ("GET", f"/api/requests/{rid}/progress")]:
                try:
                    r = c.request(method, httpx.URL(srv.base + path))
                    out.append(r.status_code)
                    json404 += r.status_code == 404 and r.headers.get("content-type", "").startswith("application/json")
                except httpx.HTTPError as exc:
                    out.append(type(exc).__name__)
    return {"requests": len(out), "statuses": _tally(out), "json_404": json404}


WEBHOOKS = ["http://127.0.0.1:9/x", "http://127.1:9/x", "http://2130706433:9/x", "http://0x7f000001:9/x",
            "http://0177.0.0.1:9/x", "http://[::ffff:127.0.0.1]:9/x", "http://localhost:9/x",
            "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x", "http://100.64.0.1/x"]


def ssrf(srv: Server) -> dict:
    statuses = []
    with httpx.Client(base_url=srv.base, headers=B, timeout=10) as c:
        for url in WEBHOOKS:  # submitted only: no engine runs, nothing is delivered
            statuses.append(c.post(f"/queue/{EP}", params={"fal_webhook": url}, json=BODY).status_code)
    return {"webhook_urls": len(WEBHOOKS), "statuses": _tally(statuses), "refused_422": statuses.count(422)}


def strict_types(srv: Server) -> dict:
    cases = [{"seed": True}, {"cns_energy_scale": False}, {"enable_cns": 1}, {"num_images": True}]
    with httpx.Client(base_url=srv.base, headers=B, timeout=10) as c:
        statuses = [c.post(f"/queue/{EP}", json={**BODY, **x}).status_code for x in cases]
    return {"payloads": len(cases), "statuses": _tally(statuses)}


def prompt_size(srv: Server) -> dict:
    from PIL import Image

    from kleinserve.engine.imageio import encode_image

    with httpx.Client(base_url=srv.base, headers=B, timeout=30) as c:
        status = c.post(f"/queue/{EP}", json={**BODY, "prompt": "p" * 1_000_000}).status_code
    png, _ = encode_image(Image.new("RGB", (64, 64)), "png", {"prompt": "p" * 1_000_000, "seed": 1})
    return {"prompt_1MB_submit": status, "png_64x64_with_1MB_prompt_bytes": len(png)}


def backpressure(srv: Server, n: int, clients: int) -> dict:
    def one(_):
        try:
            r = httpx.post(f"{srv.base}/queue/{EP}", json=BODY, headers=A, timeout=30)
            return r.status_code, r.headers.get("retry-after")
        except httpx.HTTPError as exc:
            return type(exc).__name__, None

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    took = time.monotonic() - t0
    other = httpx.post(f"{srv.base}/queue/{EP}", json=BODY, headers=B, timeout=30).status_code
    metric = [line for line in httpx.get(f"{srv.base}/metrics").text.splitlines()
              if line.startswith("kleinserve_submits_refused_total")]
    return {"submits_one_key": n, "clients": clients, "seconds": round(took, 1),
            "statuses": _tally(s for s, _ in results),
            "refused_with_retry_after": sum(1 for s, ra in results if s == 429 and ra),
            "other_key_after": other, "metric": metric}


def shutdown(tmp: Path) -> dict:
    out: dict = {}
    with Server(tmp / "shutdown", shutdown_grace=2) as srv:
        got: dict = {}

        def sync_run():
            t = time.monotonic()
            try:
                r = httpx.post(f"{srv.base}/{EP}", json=BODY, headers=A, timeout=30)
                got["sync"] = (r.status_code, r.headers.get("retry-after"), r.text[:200])
            except httpx.HTTPError as exc:
                got["sync"] = (type(exc).__name__, None, "")
            got["sync_s"] = time.monotonic() - t

        def stream():
            events = []
            try:
                with httpx.stream("POST", f"{srv.base}/{EP}/stream", json=BODY, headers=B, timeout=30) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            events.append(json.loads(line[5:]))
            except httpx.HTTPError as exc:
                events.append({"transport_error": type(exc).__name__})
            got["stream"] = events

        threads = [threading.Thread(target=sync_run), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(srv.store.list_requests(None)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.sigterm()
        for t in threads:
            t.join(30)
        time.sleep(0.5)
        jobs = srv.store.list_requests(None)
        out["sync_run"] = {"status": got["sync"][0], "retry_after": got["sync"][1],
                           "seconds_after_sigterm": round(time.monotonic() - t0, 1),
                           "body": got["sync"][2]}
        last = (got.get("stream") or [{}])[-1]
        out["stream_last_event"] = {k: last.get(k) for k in ("error_type", "status_code", "request_id",
                                                             "transport_error") if k in last}
        def cancelled(j) -> bool:
            return (j.error or {}).get("error_type") == "cancelled" or bool(j.cancel_requested)

        out["jobs_after"] = _tally(f"{j.status}{' cancelled' if cancelled(j) else ''}" for j in jobs)
    return out


def cancel_race(tmp: Path, n: int) -> dict:
    """A result committed after a recorded cancel (the worker's last step racing the cancel)."""
    from kleinserve.service import jobs as J
    from kleinserve.service.sqlite_store import SQLiteJobStore
    from kleinserve.service.store import Lease

    store = SQLiteJobStore(tmp / "race.sqlite3")
    ends = []
    for _ in range(n):
        job = store.submit(J.Job(request_id=J.new_request_id(), endpoint_id=EP, owner="o", input={},
                                 created_at=time.time()))
        claimed = store.claim_next("w")
        outcome = store.request_cancel(job.request_id)
        assert outcome.outcome == "cancel_requested"
        done = store.complete_ok(Lease.of(claimed), {"images": []})
        ends.append("cancelled" if (done.error or {}).get("error_type") == "cancelled" else "ok")
    store.close()
    return {"cancels_answered_202_then_result": n, "ended": _tally(ends)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--submits", type=int, default=400, help="queue submits of one key (backpressure)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--races", type=int, default=200)
    ap.add_argument("--no-webhooks", action="store_true", help="skip the webhook fairness scenarios (~70 s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with Server(tmp / "main") as srv:
            results["request_ids"] = request_ids(srv)
            results["ssrf_at_submit"] = ssrf(srv)
            results["strict_types"] = strict_types(srv)
            results["prompt_size"] = prompt_size(srv)
            results["backpressure"] = backpressure(srv, args.submits, args.clients)
        results["graceful_shutdown"] = shutdown(tmp)
        results["cancel_race"] = cancel_race(tmp, args.races)
        if not args.no_webhooks:
            import bench_webhooks

            results["webhooks"] = {"slow_receiver": bench_webhooks.slow_receiver(tmp, 24, 5.0, 120.0),
                                   "crash_restart": bench_webhooks.crash_restart(tmp, 40.0)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
