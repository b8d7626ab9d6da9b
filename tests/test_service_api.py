"""HTTP protocol tests that need no generation: auth, isolation, shapes, limits, routing, cancel of
queued requests, time-to-start expiry. (No engine is loaded: queued requests simply wait.)"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.service.auth import AuthConfigError, owner_id
from kleinserve.service.settings import Settings

EP = "fal-ai/flux-2/klein/9b/base"
KEY_A, KEY_B = "key-a-secret", "key-b-secret"
A = {"Authorization": f"Key {KEY_A}"}
B = {"Authorization": f"Key {KEY_B}"}
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", api_keys=[KEY_A, KEY_B], max_request_bytes=64 * 1024)


@pytest.fixture
def client(settings):
    app = create_app(settings)
    with TestClient(app) as c:
        yield c


def submit(client, body=BODY, headers=A, **kw):
    r = client.post(f"/queue/{EP}", json=body, headers=headers, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(client, rid, want="COMPLETED", timeout=20.0, headers=A):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", headers=headers)
        if r.json()["status"] == want:
            return r
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached {want}: {r.json()}")


def test_auth_required_and_isolation(client):
    for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Key"}):
        r = client.post(f"/queue/{EP}", json=BODY, headers=headers)
        assert r.status_code == 401
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
        assert r.headers["x-fal-request-id"]
    # 401 comes before validation
    assert client.post(f"/queue/{EP}", json={}, headers={}).status_code == 401
    # Bearer works too (OpenAI adapter style)
    sub = submit(client, headers={"Authorization": f"Bearer {KEY_A}"})
    rid = sub["request_id"]
    base = f"/queue/fal-ai/flux-2/requests/{rid}"
    assert client.get(base + "/status", headers=A).status_code == 202
    # another key: 404 everywhere, nothing leaks
    for method, path in (("GET", base + "/status"), ("GET", base), ("PUT", base + "/cancel"),
                         ("GET", base + "/status/stream")):
        r = client.request(method, path, headers=B)
        assert r.status_code == 404, (method, path, r.text)
        assert rid in r.json()["detail"]
    # no key at all: 401
    assert client.get(base + "/status").status_code == 401
    # jobs are stored under the key's short hash, never the key
    job = client.app.state.services.store.get(rid)
    assert job.owner == owner_id(KEY_A) and KEY_A not in json.dumps(job.to_dict())


def test_submit_response_and_status_shapes(client):
    sub = submit(client)
    rid = sub["request_id"]
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 0
    for k in ("response_url", "status_url", "cancel_url"):
        assert sub[k].startswith("http://testserver/queue/fal-ai/flux-2/requests/" + rid)
    # seed drawn at submit time so a re-run reproduces
    job = client.app.state.services.store.get(rid)
    assert isinstance(job.input["seed"], int)
    r = client.get(sub["status_url"].replace("http://testserver", "") + "?logs=1", headers=A)
    assert r.status_code == 202 and r.headers["x-fal-request-id"] == rid
    st = r.json()
    assert st["status"] == "IN_QUEUE" and st["queue_position"] == 0 and st["logs"] == []
    assert client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status?logs=0", headers=A).json()["logs"] is None
    # result before completion: a clear 4xx
    r = client.get(f"/queue/fal-ai/flux-2/requests/{rid}", headers=A)
    assert r.status_code == 400 and "still in the queue" in r.json()["detail"]


def test_queue_host_prefix_and_trailing_slashes(client):
    sub = client.post(f"/{EP}/", json=BODY, headers={**A, "host": "queue.example.test"})
    assert sub.status_code == 200, sub.text
    body = sub.json()
    rid = body["request_id"]
    assert body["status_url"] == f"http://queue.example.test/fal-ai/flux-2/requests/{rid}/status"
    r = client.get(f"/fal-ai/flux-2/requests/{rid}/status/", headers={**A, "host": "queue.example.test"})
    assert r.status_code == 202 and r.json()["request_id"] == rid
    r = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status/", headers=A)
    assert r.status_code == 202
    # non-endpoint paths on a queue host are not rewritten
    assert client.get("/health", headers={"host": "queue.example.test"}).json() == {"status": "ok"}


def test_validation_errors_are_422_with_fal_shape(client):
    cases = [
        ({"prompt": ""}, {}),
        ({"prompt": "x", "num_inference_steps": 1000}, {}),
        ({"prompt": "x", "image_size": "huge"}, {}),
        ({"no_prompt": True}, {}),
        (BODY, {"X-Fal-Request-Timeout": "soon"}),
        (BODY, {"X-Fal-Request-Timeout": "-3"}),
        (BODY, {"X-Fal-Queue-Priority": "urgent"}),
    ]
    for body, extra in cases:
        for path in (f"/queue/{EP}", f"/{EP}", f"/{EP}/stream"):
            r = client.post(path, json=body, headers={**A, **extra})
            assert r.status_code == 422, (path, body, extra, r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, list) and detail
            for d in detail:
                assert set(d) == {"loc", "msg", "type"} and isinstance(d["loc"], list)
            assert r.headers["x-fal-request-id"]
    r = client.post(f"/queue/{EP}?fal_webhook=not-a-url", json=BODY, headers=A)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    # malformed JSON
    r = client.post(f"/queue/{EP}", content=b"{nope", headers={**A, "content-type": "application/json"})
    assert r.status_code == 422


def test_request_body_limit_413(client):
    big = {"prompt": "x" * (70 * 1024)}
    r = client.post(f"/queue/{EP}", json=big, headers=A)
    assert r.status_code == 413 and "limit" in r.json()["detail"] and r.headers["x-fal-request-id"]

    # chunked (no content-length): still refused
    def gen():
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = client.post(f"/queue/{EP}", content=gen(), headers={**A, "content-type": "application/json"})
    assert r.status_code == 413


def test_cancel_queued_never_runs_and_second_cancel_is_clear(client):
    rid = submit(client)["request_id"]
    r = client.put(f"/queue/fal-ai/flux-2/requests/{rid}/cancel", headers=A)
    assert r.status_code == 202 and r.json()["status"] == "CANCELLATION_REQUESTED"
    st = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", headers=A)
    assert st.status_code == 200
    assert st.json()["status"] == "COMPLETED" and st.json()["error_type"] == "cancelled"
    r = client.put(f"/queue/fal-ai/flux-2/requests/{rid}/cancel", headers=A)
    assert r.status_code == 400 and r.json()["status"] == "ALREADY_COMPLETED"
    assert "already cancelled" in r.json()["detail"]
    res = client.get(f"/queue/fal-ai/flux-2/requests/{rid}", headers=A)
    assert res.status_code == 400 and res.json()["error_type"] == "cancelled"
    job = client.app.state.services.store.get(rid)
    assert job.attempts == 0 and job.started_at is None
    # the status stream of a finished request: one COMPLETED event, then it closes
    with client.stream("GET", f"/queue/fal-ai/flux-2/requests/{rid}/status/stream", headers=A) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["status"] for e in events] == ["COMPLETED"]


def test_request_timeout_expires_queued_request_504(client):
    rid = submit(client, headers={**A, "X-Fal-Request-Timeout": "1.5"})["request_id"]
    t0 = time.monotonic()
    st = wait_status(client, rid, timeout=15)
    assert time.monotonic() - t0 < 10
    assert st.json()["error_type"] == "timeout"
    r = client.get(f"/queue/fal-ai/flux-2/requests/{rid}", headers=A)
    assert r.status_code == 504
    assert r.headers["X-Fal-Request-Timeout-Type"] == "user"
    assert r.headers["x-fal-request-id"] == rid
    assert r.json()["error_type"] == "timeout"


def test_priority_orders_the_queue(client):
    low = submit(client, headers={**A, "X-Fal-Queue-Priority": "low"})
    normal = submit(client)
    st_low = client.get(f"/queue/fal-ai/flux-2/requests/{low['request_id']}/status", headers=A).json()
    st_norm = client.get(f"/queue/fal-ai/flux-2/requests/{normal['request_id']}/status", headers=A).json()
    assert (st_norm["queue_position"], st_low["queue_position"]) == (0, 1)


def test_health_ready_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    spec = client.get("/openapi.json").json()
    assert f"/{EP}" in spec["paths"] and f"/queue/{EP}" in spec["paths"]
    assert "/queue/fal-ai/flux-2/requests/{request_id}/status" in spec["paths"]
    assert "FluxKleinInput" in json.dumps(spec)
    assert client.get("/docs").status_code == 200
    assert client.get("/nope").headers["x-fal-request-id"]


def test_auth_config_refuses_without_keys(tmp_path):
    with pytest.raises(AuthConfigError):
        create_app(Settings(data_dir=tmp_path))
    app = create_app(Settings(data_dir=tmp_path, no_auth=True))
    with TestClient(app) as c:
        r = c.post(f"/queue/{EP}", json=BODY)
        assert r.status_code == 200
        assert c.app.state.services.store.get(r.json()["request_id"]).owner == "anonymous"


def test_settings_env_and_flags(monkeypatch, tmp_path):
    import argparse

    from kleinserve.api.server import add_serve_arguments

    monkeypatch.setenv("KLEINSERVE_API_KEYS", "e1, e2")
    monkeypatch.setenv("KLEINSERVE_PORT", "9001")
    monkeypatch.setenv("KLEINSERVE_MAX_REQUEST_BYTES", "2MiB")
    monkeypatch.setenv("KLEINSERVE_RESULT_RETENTION", "24h")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = Settings.from_args(p.parse_args(["--data-dir", str(tmp_path), "--port", "9100"]))
    assert (s.api_keys, s.port, s.max_request_bytes, s.result_retention) == (["e1", "e2"], 9100, 2 << 20, 86400.0)
    s = Settings.from_args(p.parse_args(["--api-key", "f1", "--api-key", "f2", "--no-auth"]))
    assert s.api_keys == ["f1", "f2"] and s.no_auth and s.port == 9001
    monkeypatch.setenv("KLEINSERVE_NO_AUTH", "1")
    assert Settings.from_args(p.parse_args([])).no_auth
    assert Settings.from_args(p.parse_args(["--batch-images", " 4 "])).batch_images == 4
    # A bad value names the flag (or the env var) it came from, in words a user reads.
    with pytest.raises(ValueError, match=r"^--batch-images: not a whole number: 'four'$"):
        Settings.from_args(p.parse_args(["--batch-images", "four"]))
    with pytest.raises(ValueError, match="batch images must be >= 1"):
        Settings.from_args(p.parse_args(["--batch-images", "0"]))
    monkeypatch.setenv("KLEINSERVE_PORT", "eighty")
    with pytest.raises(ValueError, match=r"^KLEINSERVE_PORT: not a whole number: 'eighty'$"):
        Settings.from_args(p.parse_args([]))


def test_webhook_settings_reach_the_dispatcher(monkeypatch, tmp_path):
    import argparse

    from kleinserve.api.server import add_serve_arguments

    monkeypatch.setenv("KLEINSERVE_WEBHOOK_MAX_ATTEMPTS", "4")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = Settings.from_args(p.parse_args(["--data-dir", str(tmp_path), "--api-key", KEY_A,
                                         "--webhook-backoff-base", "2m"]))
    assert (s.webhook_max_attempts, s.webhook_backoff_base) == (4, 120.0)
    app = create_app(s, start_worker=False)
    with TestClient(app):
        d = app.state.runtime.dispatcher
        assert (d.max_attempts, d.backoff_base) == (4, 120.0)
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, webhook_max_attempts=0)


@pytest.mark.parametrize("max_attempts, expect", [(1, "crashed"), (3, "requeued")])
def test_startup_recovery_of_a_dead_workers_request(tmp_path, max_attempts, expect):
    """A request left IN_PROGRESS by a worker process that no longer exists is recovered when the app
    starts: re-queued, or failed as "crashed" once it used up its attempts."""
    import subprocess
    import sys

    from kleinserve.service.jobs import Job, new_request_id
    from kleinserve.service.sqlite_store import SQLiteJobStore
    from kleinserve.service.worker import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data_dir = tmp_path / "data"
    store = SQLiteJobStore.in_data_dir(data_dir)
    rid = store.submit(Job(request_id=new_request_id(), endpoint_id=EP, owner=owner_id(KEY_A),
                           input={**BODY, "seed": 1})).request_id
    assert store.claim_next(f"{_HOST}:{dead.pid}:deadbeef:w0").attempts == 1
    store.close()
    app = create_app(Settings(data_dir=data_dir, api_keys=[KEY_A], max_attempts=max_attempts))
    with TestClient(app) as c:
        st = c.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", params={"logs": 1}, headers=A).json()
        if expect == "crashed":
            assert st["status"] == "COMPLETED" and st["error_type"] == "crashed"
            r = c.get(f"/queue/fal-ai/flux-2/requests/{rid}", headers=A)
            assert r.status_code == 500 and "giving up" in r.json()["detail"]
        else:
            assert st["status"] == "IN_QUEUE" and st["queue_position"] == 0
            assert any("re-queued" in line["message"] for line in st["logs"])


def test_model_that_failed_to_load_is_reported(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys=[KEY_A], model=str(tmp_path / "missing")),
                     load_engine=True)
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/ready").json().get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "missing" in r.json()["detail"]
        r = c.post(f"/queue/{EP}", json=BODY, headers=A)
        assert r.status_code == 503 and "failed to load" in r.json()["detail"]
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("no_warmup", [False, True])
def test_warmup_runs_before_ready_unless_disabled(tmp_path, tiny_model_dir, monkeypatch, no_warmup):
    from kleinserve.engine.engine import Engine

    calls = []
    real_warmup = Engine.warmup

    def recording_warmup(self):
        calls.append(self.info.source)
        return real_warmup(self)

    monkeypatch.setattr(Engine, "warmup", recording_warmup)
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys=[KEY_A], model=str(tiny_model_dir),
                              no_warmup=no_warmup), load_engine=True)
    with TestClient(app) as c:
        deadline = time.monotonic() + 120
        while c.get("/ready").json().get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        body = c.get("/ready").json()
        assert body["status"] == "ready", body
        if no_warmup:
            assert calls == [] and body["model"]["warmup_seconds"] is None
        else:
            # CPU compiles nothing by default, so the warm-up is there but takes no time.
            assert calls == [str(tiny_model_dir)] and body["model"]["warmup_seconds"] == 0.0


def test_no_retry_header_is_kept_with_the_job(client):
    asked = submit(client, headers={**A, "x-fal-no-retry": "1"})
    plain = submit(client)
    store = client.app.state.services.store
    assert store.get(asked["request_id"]).extra.get("no_retry") is True
    assert not store.get(plain["request_id"]).extra.get("no_retry")
