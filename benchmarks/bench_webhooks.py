#!/usr/bin/env python
"""Webhook fairness (issue 10 item 7): does a slow receiver delay another target's webhook, and how
soon is a delivery interrupted by a crash retried? Loopback only, no model.

Scenario "slow receiver": `--slow` completed requests whose webhook goes to a receiver that holds
every POST `--delay` seconds, then ONE request whose webhook goes to a fast receiver (the other
key's). The real WebhookDispatcher on the real SQLite store delivers them; measured: how long the
fast webhook waited, and how long until every slow one had been attempted once.

Scenario "crash": a dispatcher leases a due webhook and dies before sending it (the lease is taken
with that dispatcher's own lease time); a fresh dispatcher (the restarted server) starts at once.
Measured: seconds until the webhook arrives (bounded by `--crash-wait`).

    python benchmarks/bench_webhooks.py                 # ~1 min on today's code
    python benchmarks/bench_webhooks.py --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # run from a checkout

from kleinserve.service import jobs as J  # noqa: E402
from kleinserve.service.sqlite_store import SQLiteJobStore  # noqa: E402
from kleinserve.service.store import Lease
from kleinserve.service.webhooks import WebhookDispatcher, WebhookSigner  # noqa: E402


class Receiver:
    def __init__(self, delay: float = 0.0):
        self.times: list[float] = []
        self.delay = delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.times.append(time.monotonic())
                time.sleep(outer.delay)
                try:
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dispatcher(store, signer, **kw) -> WebhookDispatcher:
    """The dispatcher of the code under test, allowed to reach loopback (before issue 10 it was the
    default; after, `policy=` says so)."""
    params = inspect.signature(WebhookDispatcher).parameters
    if "policy" in params:
        from kleinserve.service.netguard import NetPolicy

        kw["policy"] = NetPolicy(allow_private=True)
    return WebhookDispatcher(store, signer, poll_interval=0.05, **kw)


def _completed(store, url: str, owner: str) -> str:
    job = store.submit(J.Job(request_id=J.new_request_id(), endpoint_id="bench", owner=owner, input={},
                             webhook_url=url, created_at=time.time()))
    claimed = store.claim_next("bench-worker")
    store.complete_ok(Lease.of(claimed), {"ok": True})
    return job.request_id


def slow_receiver(tmp: Path, slow: int, delay: float, limit: float) -> dict:
    store = SQLiteJobStore(tmp / "slow.sqlite3")
    signer = WebhookSigner.from_data_dir(tmp)
    slow_rx, fast_rx = Receiver(delay), Receiver()
    try:
        for _ in range(slow):
            _completed(store, slow_rx.url, "key-a")
        _completed(store, fast_rx.url, "key-b")
        d = _dispatcher(store, signer)
        t0 = time.monotonic()
        d.start()
        deadline = t0 + limit
        while time.monotonic() < deadline and not (fast_rx.times and len(slow_rx.times) >= slow):
            time.sleep(0.02)
        d.stop(timeout=1.0) if "timeout" in inspect.signature(d.stop).parameters else d.stop()
        return {"slow_webhooks": slow, "slow_receiver_delay_s": delay,
                "fast_webhook_wait_s": round(fast_rx.times[0] - t0, 2) if fast_rx.times else None,
                "all_slow_attempted_s": round(slow_rx.times[slow - 1] - t0, 2) if len(slow_rx.times) >= slow
                else None, "bounded_at_s": limit}
    finally:
        slow_rx.close()
        fast_rx.close()
        store.close()


def crash_restart(tmp: Path, limit: float) -> dict:
    store = SQLiteJobStore(tmp / "crash.sqlite3")
    signer = WebhookSigner.from_data_dir(tmp)
    rx = Receiver()
    try:
        _completed(store, rx.url, "key-a")
        crashed = _dispatcher(store, signer)  # never started: we only use its lease time
        assert len(store.due_webhooks(time.time(), 10, lease_seconds=crashed.lease_seconds)) == 1
        d = _dispatcher(store, signer)
        t0 = time.monotonic()
        d.start()
        while time.monotonic() < t0 + limit and not rx.times:
            time.sleep(0.05)
        d.stop()
        return {"lease_s": crashed.lease_seconds,
                "redelivered_after_restart_s": round(rx.times[0] - t0, 2) if rx.times else None,
                "bounded_at_s": limit}
    finally:
        rx.close()
        store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow", type=int, default=24, help="webhooks to the slow receiver")
    ap.add_argument("--delay", type=float, default=5.0, help="seconds the slow receiver holds each POST")
    ap.add_argument("--limit", type=float, default=90.0, help="give the slow scenario at most this long")
    ap.add_argument("--crash-wait", type=float, default=40.0, help="give the crash scenario at most this long")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = {"slow_receiver": slow_receiver(Path(d), args.slow, args.delay, args.limit),
               "crash_restart": crash_restart(Path(d), args.crash_wait)}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
