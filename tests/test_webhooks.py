"""Webhooks: Ed25519 signing + JWKS + verification, and delivery with retries (at-least-once).

Unit tests run the real `WebhookDispatcher` against the real SQLite job store and a local HTTP
receiver; the end-to-end tests submit through the HTTP API with `?fal_webhook=` and verify the
signature against the server's own `/.well-known/jwks.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from kleinserve.service import jobs as J
from kleinserve.service.netguard import NetPolicy
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.store import Lease
from kleinserve.service.webhooks import (
    HEADER_REQUEST_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    HEADER_USER_ID,
    InvalidWebhookUrl,
    WebhookDispatcher,
    WebhookSigner,
    backoff_delay,
    signing_message,
    validate_webhook_url,
    verify_webhook,
    webhook_payload,
)

# ------------------------------------------------------------------------------------ a receiver

LOOPBACK_OK = NetPolicy(allow_private=True)  # the receivers here listen on 127.0.0.1


class Receiver:
    """A local HTTP server recording every POST; `fail_first` deliveries answer 500."""

    def __init__(self, fail_first: int = 0, status: int = 200):
        self.received: list[dict] = []
        self.fail_first = fail_first
        self.status = status
        self.event = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                n = len(outer.received)
                outer.received.append(
                    {"headers": dict(self.headers.items()), "body": body, "time": time.time()}
                )
                code = 500 if n < outer.fail_first else outer.status
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()
                if code < 300:
                    outer.event.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?x=1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, timeout: float = 20.0) -> dict:
        assert self.event.wait(timeout), f"no successful delivery; got {len(self.received)} tries"
        return self.received[-1]


# ------------------------------------------------------------------------------------ signing


def test_key_is_created_once_with_0600(tmp_path: Path):
    s1 = WebhookSigner.from_data_dir(tmp_path)
    key_file = tmp_path / "keys" / "webhook-ed25519.pem"
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key_file.read_bytes()
    s2 = WebhookSigner.from_data_dir(tmp_path)
    assert s1.jwks() == s2.jwks()  # persisted: the same key after a restart


def test_jwks_shape(tmp_path: Path):
    jwks = WebhookSigner.from_data_dir(tmp_path).jwks()
    (k,) = jwks["keys"]
    assert k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["alg"] == "EdDSA" and k["use"] == "sig"
    assert k["kid"] and "=" not in k["x"] and len(k["x"]) == 43  # 32 bytes, base64url, no padding


def test_sign_and_verify(tmp_path: Path):
    signer = WebhookSigner.from_data_dir(tmp_path)
    body = b'{"request_id":"r1","status":"OK"}'
    headers = signer.headers("r1", "user-1", body)
    assert set(headers) == {HEADER_REQUEST_ID, HEADER_USER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE}
    assert verify_webhook(headers, body, signer.jwks())
    # the message is exactly fal's four lines
    msg = signing_message("r1", "user-1", headers[HEADER_TIMESTAMP], body)
    assert msg == f"r1\nuser-1\n{headers[HEADER_TIMESTAMP]}\n{hashlib.sha256(body).hexdigest()}".encode()
    signer.public_key.verify(bytes.fromhex(headers[HEADER_SIGNATURE]), msg)
    # lower-case header names (what most frameworks hand over) work too
    assert verify_webhook({k.lower(): v for k, v in headers.items()}, body, signer.jwks())
    # tampering is detected
    assert not verify_webhook(headers, body + b" ", signer.jwks())
    assert not verify_webhook({**headers, HEADER_REQUEST_ID: "r2"}, body, signer.jwks())
    assert not verify_webhook({**headers, HEADER_USER_ID: "u2"}, body, signer.jwks())
    other = WebhookSigner.from_data_dir(tmp_path / "other")
    assert not verify_webhook(headers, body, other.jwks())
    assert not verify_webhook({}, body, signer.jwks())
    assert not verify_webhook({**headers, HEADER_SIGNATURE: "zz"}, body, signer.jwks())


def test_timestamp_window(tmp_path: Path):
    signer = WebhookSigner.from_data_dir(tmp_path)
    body = b"{}"
    old = signer.headers("r", "u", body, timestamp=int(time.time()) - 301)
    assert not verify_webhook(old, body, signer.jwks())
    recent = signer.headers("r", "u", body, timestamp=int(time.time()) - 299)
    assert verify_webhook(recent, body, signer.jwks())
    future = signer.headers("r", "u", body, timestamp=int(time.time()) + 400)
    assert not verify_webhook(future, body, signer.jwks())


def test_validate_webhook_url():
    assert validate_webhook_url("https://example.com/hook?a=1")
    assert validate_webhook_url("http://127.0.0.1:8000/x", NetPolicy(allow_private=True))
    for bad in ["ftp://example.com/x", "file:///etc/passwd", "javascript:alert(1)", "", "/relative",
                "https://user:pw@example.com/", "https://exa mple.com/", "http://[::1/x",
                "https://example.com/" + "a" * 3000, "https:///nohost"]:
        with pytest.raises(InvalidWebhookUrl):
            validate_webhook_url(bad)
    for private in ["http://127.0.0.1/x", "http://10.1.2.3/", "http://[::1]/", "http://localhost/",
                    "http://169.254.169.254/latest/meta-data"]:
        with pytest.raises(InvalidWebhookUrl):
            validate_webhook_url(private)
    assert validate_webhook_url("https://93.184.216.34/x")


def test_backoff_schedule_fits_fal_policy():
    # fal: 10 attempts within 2 hours -> our default 9 waits add up to just under 2 h
    waits = [backoff_delay(n, 14.0, 3600.0, jitter=0) for n in range(1, 10)]
    assert waits[0] == 14.0 and waits[1] == 28.0
    assert 6000 < sum(waits) <= 7200
    assert backoff_delay(30, 1.0, 5.0, jitter=0) == 5.0


# ------------------------------------------------------------------------------------ payloads


def _job(**kw) -> J.Job:
    base = dict(request_id=J.new_request_id(), endpoint_id="fal-ai/flux-2/klein/9b/base",
                owner="owner-1", input={"prompt": "x"})
    base.update(kw)
    return J.Job(**base)


def test_payload_shapes():
    ok = _job(status=J.COMPLETED, result={"images": [], "seed": 1})
    assert webhook_payload(ok) == {
        "request_id": ok.request_id,
        "gateway_request_id": ok.request_id,
        "status": "OK",
        "payload": {"images": [], "seed": 1},
    }
    bad = _job(status=J.COMPLETED, error=J.job_error("boom", J.ERR_INTERNAL, 500))
    p = webhook_payload(bad)
    assert p["status"] == "ERROR" and p["error"] == "Invalid status code: 500"
    assert p["payload"] == {"detail": "boom", "error_type": "internal", "request_id": bad.request_id}
    assert "gateway_request_id" in p and p["request_id"] == bad.request_id


# ------------------------------------------------------------------------------------ dispatcher


def _completed_with_webhook(store: SQLiteJobStore, url: str, *, ok: bool = True) -> J.Job:
    job = store.submit(_job(webhook_url=url))
    claimed = store.claim_next("w1")
    assert claimed is not None and claimed.request_id == job.request_id
    lease = Lease.of(claimed)
    if ok:
        return store.complete_ok(lease, {"images": [{"url": "u"}], "seed": 7})
    return store.complete_error(lease, J.job_error("model blew up", J.ERR_MODEL, 500))


@pytest.fixture()
def store(tmp_path: Path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def test_dispatcher_delivers_signed_payload(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    with Receiver() as rx:
        job = _completed_with_webhook(store, rx.url)
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.05).start()
        try:
            got = rx.wait()
        finally:
            d.stop()
    assert verify_webhook(got["headers"], got["body"], signer.jwks())
    assert got["headers"][HEADER_USER_ID] == "owner-1"
    assert got["headers"][HEADER_REQUEST_ID] == job.request_id
    assert got["headers"]["Content-Type"] == "application/json"
    body = json.loads(got["body"])
    assert body == {"request_id": job.request_id, "gateway_request_id": job.request_id,
                    "status": "OK", "payload": {"images": [{"url": "u"}], "seed": 7}}
    final = store.get(job.request_id)
    assert final.webhook_state == J.WEBHOOK_DELIVERED and final.webhook_attempts == 1
    assert len(rx.received) == 1


def test_dispatcher_error_payload(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    with Receiver() as rx:
        job = _completed_with_webhook(store, rx.url, ok=False)
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.05).start()
        try:
            got = rx.wait()
        finally:
            d.stop()
    body = json.loads(got["body"])
    assert body["status"] == "ERROR" and body["request_id"] == job.request_id
    assert body["error"] == "Invalid status code: 500"
    assert body["payload"] == {"detail": "model blew up", "error_type": "model",
                               "request_id": job.request_id}
    assert verify_webhook(got["headers"], got["body"], signer.jwks())


def test_dispatcher_retries_with_backoff_until_success(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    with Receiver(fail_first=3) as rx:
        job = _completed_with_webhook(store, rx.url)
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.02, backoff_base=0.2).start()
        try:
            rx.wait()
        finally:
            d.stop()
    assert len(rx.received) == 4
    gaps = [b["time"] - a["time"] for a, b in zip(rx.received, rx.received[1:], strict=False)]
    # exponential: ~0.2, ~0.4, ~0.8 s (+-10 % jitter, plus polling latency)
    assert gaps[0] >= 0.17 and gaps[1] >= 0.35 and gaps[2] >= 0.7, gaps
    assert gaps[2] > gaps[0]
    # every try carries the same body and a valid signature (at-least-once: receivers dedupe by id)
    assert len({r["body"] for r in rx.received}) == 1
    assert all(verify_webhook(r["headers"], r["body"], signer.jwks()) for r in rx.received)
    final = store.get(job.request_id)
    assert final.webhook_state == J.WEBHOOK_DELIVERED and final.webhook_attempts == 4
    assert final.webhook_last_error is None


def test_dispatcher_gives_up_after_max_attempts(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    with Receiver(fail_first=100) as rx:
        job = _completed_with_webhook(store, rx.url)
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.02, backoff_base=0.02,
                              max_attempts=3).start()
        try:
            deadline = time.time() + 15
            while store.get(job.request_id).webhook_state != J.WEBHOOK_FAILED:
                assert time.time() < deadline, "never gave up"
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            d.stop()
    assert len(rx.received) == 3
    final = store.get(job.request_id)
    assert final.webhook_attempts == 3 and "500" in (final.webhook_last_error or "")


def test_unreachable_receiver_is_retried(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _completed_with_webhook(store, f"http://127.0.0.1:{port}/hook")
    d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.02, backoff_base=0.05, max_attempts=2)
    d.start()
    try:
        deadline = time.time() + 15
        while store.get(job.request_id).webhook_state != J.WEBHOOK_FAILED:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        d.stop()
    final = store.get(job.request_id)
    assert final.webhook_attempts == 2 and "ConnectError" in final.webhook_last_error


# ================================================================================ end to end

KEY = "webhook-test-key"
ENDPOINT = "fal-ai/flux-2/klein/9b/base"
TINY_INPUT = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64},
              "num_inference_steps": 4, "seed": 7, "enable_safety_checker": False}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_engine):
    """The real app (tiny model, real worker and dispatcher) over TLS, in this process."""
    from kleinserve.api.app import create_app
    from kleinserve.service.settings import Settings
    from service_helpers import make_self_signed_cert, serve_app, wait_for_http

    d = tmp_path_factory.mktemp("webhooks-e2e")
    cert, key = make_self_signed_cert(d / "cert")
    # --webhook-backoff-base 0.2s: the production default (14 s) would make the retry test slow
    app = create_app(Settings(data_dir=d / "data", api_keys=[KEY], model="tiny", webhook_backoff_base=0.2,
                              webhook_allow_private=True),
                     engine=tiny_engine)
    with serve_app(app, ssl_cert=cert, ssl_key=key) as srv:
        wait_for_http(srv.base_url + "/ready", timeout=240,
                      verify=ssl.create_default_context(cafile=str(cert)))
        srv.cert = cert
        srv.app = app
        yield srv


def _client(srv) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, verify=ssl.create_default_context(cafile=str(srv.cert)),
                        headers={"Authorization": f"Key {KEY}"}, timeout=30)


def test_e2e_real_fal_client_webhook(live):
    """`fal_client.submit(..., webhook_url=...)`: the receiver gets an OK payload equal to the result,
    signed with the key published at /.well-known/jwks.json."""
    from service_helpers import fal_client_env, run_fal_client_script

    with Receiver() as rx, _client(live) as c:
        code = (
            "import json, fal_client\n"
            f"h = fal_client.submit({ENDPOINT!r}, arguments={TINY_INPUT!r}, webhook_url={rx.url!r})\n"
            "print(json.dumps({'request_id': h.request_id}))\n"
        )
        proc = run_fal_client_script(code, fal_client_env(live.host_port, KEY, live.cert))
        assert proc.returncode == 0, proc.stderr[-3000:]
        request_id = json.loads(proc.stdout.strip().splitlines()[-1])["request_id"]
        got = rx.wait(timeout=180)
        jwks = c.get("/.well-known/jwks.json").json()
        result = c.get(f"/queue/fal-ai/flux-2/requests/{request_id}")
    assert verify_webhook(got["headers"], got["body"], jwks)
    assert got["headers"][HEADER_REQUEST_ID] == request_id
    assert got["headers"][HEADER_USER_ID].startswith("k_")  # the API key's owner id, never the key
    body = json.loads(got["body"])
    assert body["status"] == "OK" and body["request_id"] == request_id
    assert body["gateway_request_id"] == request_id
    assert result.status_code == 200 and body["payload"] == result.json()
    assert body["payload"]["images"][0]["url"].startswith(live.base_url + "/files/")


def test_e2e_retries_until_delivered(live):
    with Receiver(fail_first=2) as rx, _client(live) as c:
        r = c.post(f"/queue/{ENDPOINT}", params={"fal_webhook": rx.url}, json=TINY_INPUT)
        assert r.status_code == 200, r.text
        request_id = r.json()["request_id"]
        rx.wait(timeout=180)
        jwks = c.get("/.well-known/jwks.json").json()
    assert len(rx.received) == 3
    # retried on the configured schedule (0.2 s, 0.4 s + polling), not the default 14 s, 28 s
    assert rx.received[-1]["time"] - rx.received[0]["time"] < 10
    assert all(verify_webhook(x["headers"], x["body"], jwks) for x in rx.received)
    assert json.loads(rx.received[-1]["body"])["request_id"] == request_id
    job = live.app.state.services.store.get(request_id)
    assert job.webhook_state == J.WEBHOOK_DELIVERED and job.webhook_attempts == 3


def test_e2e_cancelled_request_gets_error_payload(live):
    with Receiver() as rx, _client(live) as c:
        r = c.post(f"/queue/{ENDPOINT}", params={"fal_webhook": rx.url},
                   json={**TINY_INPUT, "num_inference_steps": 50, "image_size": {"width": 512, "height": 512}},
                   headers={"X-Fal-Queue-Priority": "low"})
        request_id = r.json()["request_id"]
        assert c.put(f"/queue/fal-ai/flux-2/requests/{request_id}/cancel").status_code in (200, 202)
        got = rx.wait(timeout=180)
        result = c.get(f"/queue/fal-ai/flux-2/requests/{request_id}")
        jwks = c.get("/.well-known/jwks.json").json()
    assert verify_webhook(got["headers"], got["body"], jwks)
    body = json.loads(got["body"])
    assert body["status"] == "ERROR" and body["request_id"] == request_id
    assert body["payload"]["error_type"] == "cancelled"
    # the ERROR payload is exactly what the result endpoint answers, with its status in `error`
    assert body["payload"] == result.json()
    assert body["error"] == f"Invalid status code: {result.status_code}"


def test_e2e_invalid_webhook_url_is_refused(live):
    with _client(live) as c:
        for bad in ["ftp://example.com/x", "not a url", "https://user:pw@example.com/"]:
            r = c.post(f"/queue/{ENDPOINT}", params={"fal_webhook": bad}, json=TINY_INPUT)
            assert r.status_code == 422, (bad, r.text)


# ================================================================================ fairness (issue 10 item 7)


class SlowReceiver(Receiver):
    """A receiver that holds every POST `delay` seconds; records the most POSTs it held at once."""

    def __init__(self, delay: float):
        super().__init__()
        self.active = 0
        self.max_active = 0
        lock = threading.Lock()
        outer = self
        handler = self.server.RequestHandlerClass
        inner_post = handler.do_POST

        def do_post(h):
            with lock:
                outer.active += 1
                outer.max_active = max(outer.max_active, outer.active)
            time.sleep(delay)
            with lock:
                outer.active -= 1
            inner_post(h)

        handler.do_POST = do_post
        self.server.daemon_threads = True


def test_a_slow_target_does_not_delay_another_targets_webhook(tmp_path: Path, store: SQLiteJobStore):
    signer = WebhookSigner.from_data_dir(tmp_path)
    with SlowReceiver(delay=3.0) as slow, Receiver() as fast:
        for _ in range(8):
            _completed_with_webhook(store, slow.url)
        _completed_with_webhook(store, fast.url)  # last in line
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.05)
        t0 = time.monotonic()
        d.start()
        try:
            fast.wait(timeout=20)
            waited = time.monotonic() - t0
            time.sleep(0.5)
            assert slow.max_active <= d.per_target  # the slow target holds at most its share
        finally:
            d.stop(timeout=1)
    assert waited < 2.0, f"the fast target waited {waited:.1f}s behind the slow one"


def test_a_failing_target_backs_off_without_blocking_others_and_logs_why(tmp_path: Path, store, caplog):
    from kleinserve.service.logging import TextFormatter
    from service_helpers import free_port

    signer = WebhookSigner.from_data_dir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there: connection refused
    with Receiver() as fast:
        dead_jobs = [_completed_with_webhook(store, dead) for _ in range(6)]
        _completed_with_webhook(store, fast.url)
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.05, backoff_base=0.05,
                              max_attempts=50)
        with caplog.at_level(logging.WARNING, logger="kleinserve.service.webhooks"):
            t0 = time.monotonic()
            d.start()
            try:
                fast.wait(timeout=10)
                assert time.monotonic() - t0 < 2.0
                time.sleep(2.0)
            finally:
                d.stop(timeout=1)
    attempts = sum(store.get(j.request_id).webhook_attempts for j in dead_jobs)
    # per-target backoff (0.5 s, 1 s, 2 s ...) caps the attempts; without it each job's own 0.05 s
    # schedule would have made well over a hundred in these ~2 s
    assert 1 <= attempts <= 12, attempts
    lines = [TextFormatter().format(r) for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    line = lines[0]
    assert dead.rsplit("/", 1)[0] in line and "attempt 1 of 50" in line and "ConnectError" in line
    assert "next try: in" in line and "/hook" not in line  # the target, never the path or query


def test_a_delivery_interrupted_by_a_crash_is_retried_soon_after_restart(tmp_path: Path, store):
    signer = WebhookSigner.from_data_dir(tmp_path)
    assert WebhookDispatcher(store, signer).lease_seconds <= 30  # was 120 s
    with Receiver() as rx:
        _completed_with_webhook(store, rx.url)
        crashed = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, timeout=1.0)
        assert len(store.due_webhooks(time.time(), 5, lease_seconds=crashed.lease_seconds)) == 1
        d = WebhookDispatcher(store, signer, policy=LOOPBACK_OK, poll_interval=0.05, timeout=1.0)
        t0 = time.monotonic()
        d.start()
        try:
            rx.wait(timeout=crashed.lease_seconds + 5)
        finally:
            d.stop(timeout=1)
    assert time.monotonic() - t0 <= crashed.lease_seconds + 2
