"""Issue 10 (hardening): request ids from the URL, SSRF guard on webhooks, backpressure, input
limits, strict types, graceful shutdown, OpenAPI. Loopback only; no engine unless a test loads the
tiny one."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.endpoints import default_registry
from kleinserve.service.logging import TextFormatter
from kleinserve.service.runtime import build_services
from kleinserve.service.settings import Settings
from kleinserve.service.store import Lease

EP = "fal-ai/flux-2/klein/9b/base"
KEY_A, KEY_B = "key-a-secret", "key-b-secret"
A = {"Authorization": f"Key {KEY_A}"}
B = {"Authorization": f"Key {KEY_B}"}
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}


def make_settings(tmp_path, **kw) -> Settings:
    kw.setdefault("max_request_bytes", 64 * 1024)
    return Settings(data_dir=tmp_path / "data", api_keys=[KEY_A, KEY_B], **kw)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(make_settings(tmp_path))) as c:
        yield c


# ------------------------------------------------------------------------------ 1. request ids

BAD_IDS = ["%E2%82%AC", "abc%0D%0AINFO%20forged%20line", "not-a-uuid", "x" * 300,
           "00000000-0000-0000-0000-00000000000G", "%00"]


def _routes(rid: str):
    q = f"/queue/fal-ai/flux-2/requests/{rid}"
    return [("GET", q + "/status"), ("GET", q), ("PUT", q + "/cancel"), ("GET", q + "/status/stream"),
            ("GET", f"/api/requests/{rid}/progress")]


@pytest.mark.parametrize("rid", BAD_IDS)
def test_a_request_id_that_is_not_a_uuid_is_a_json_404(client, rid, caplog):
    caplog.set_level(logging.DEBUG)
    for method, path in _routes(rid):
        r = client.request(method, path, headers=A)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        detail = r.json()["detail"]
        assert "UUID" in detail and "forged" not in detail and "\u20ac" not in detail
        header = r.headers["x-fal-request-id"]
        assert header.isascii() and "\r" not in header and "\n" not in header and "forged" not in header
    fmt = TextFormatter()
    for rec in caplog.records:
        line = fmt.format(rec)
        assert "\r" not in line and "\n" not in line.split("Traceback")[0], line


def test_a_well_formed_unknown_id_still_names_itself(client):
    rid = "01234567-89ab-4def-8123-456789abcdef"
    r = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", headers=A)
    assert r.status_code == 404 and rid in r.json()["detail"]
    assert r.headers["x-fal-request-id"] == rid


def test_text_log_lines_cannot_be_forged():
    rec = logging.LogRecord("x", logging.INFO, "x", 0, "path %s", ("/a\r\nINFO forged",), None)
    line = TextFormatter().format(rec)
    assert "\n" not in line and "\r" not in line and "\\r\\nINFO forged" in line


def test_the_500_handler_and_the_middleware_never_put_raw_text_in_a_header(tmp_path):
    app = create_app(make_settings(tmp_path), start_worker=False)

    @app.get("/boom/{name}")
    async def boom(name: str):
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom/%E2%82%AC%0D%0Aforged")
        assert r.status_code == 500 and r.json()["error_type"] == "internal"
        assert r.headers["x-fal-request-id"].isascii()


# ------------------------------------------------------------------------------ 8. strict types

@pytest.mark.parametrize("field,value", [
    ("seed", True), ("num_inference_steps", False), ("guidance_scale", True), ("num_images", True),
    ("cns_energy_scale", False), ("cns_num_freq_bins", True),
    ("enable_cns", 1), ("sync_mode", 0), ("enable_safety_checker", 1.0), ("cns_alpha_use_fnorm", 0),
])
def test_a_bool_for_a_number_or_a_number_for_a_bool_is_a_422(client, field, value):
    r = client.post(f"/queue/{EP}", json={**BODY, field: value}, headers=A)
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert ["body", field] in locs, locs


def test_a_bool_for_an_image_dimension_is_a_422(client):
    r = client.post(f"/queue/{EP}", json={**BODY, "image_size": {"width": True, "height": 64}}, headers=A)
    assert r.status_code == 422
    assert any(d["loc"][-1] == "width" for d in r.json()["detail"])


def test_numbers_and_bools_of_the_right_kind_still_pass():
    from kleinserve.schema import FluxKleinInput

    m = FluxKleinInput.model_validate({**BODY, "seed": 7, "guidance_scale": 4, "enable_cns": True,
                                       "cns_energy_scale": 1, "sync_mode": False})
    assert m.seed == 7 and m.guidance_scale == 4.0 and m.enable_cns is True and m.cns_energy_scale == 1.0


# ------------------------------------------------------------------------------ 3. backpressure

def _refused(r, limit):
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    return r.json()


def _counter(client, limit) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'kleinserve_submits_refused_total{{limit="{limit}"}}'):
            return float(line.split()[-1])
    raise AssertionError("no kleinserve_submits_refused_total metric")


def test_queue_limits_answer_429_with_retry_after_on_every_submit_route(tmp_path):
    # No engine: every submitted request stays queued.
    settings = make_settings(tmp_path, max_queued_per_key=3, max_queue_depth=5)
    with TestClient(create_app(settings)) as c:
        per_key0, depth0 = _counter(c, "max_queued_per_key"), _counter(c, "max_queue_depth")
        for _ in range(3):
            assert c.post(f"/queue/{EP}", json=BODY, headers=A).status_code == 200
        body = _refused(c.post(f"/queue/{EP}", json=BODY, headers=A), "max_queued_per_key")
        assert body["limit"] == "max_queued_per_key" and body["limit_value"] == 3
        assert "--max-queued-per-key" in body["detail"]
        _refused(c.post(f"/{EP}", json=BODY, headers=A), "max_queued_per_key")  # sync run
        _refused(c.post(f"/{EP}/stream", json=BODY, headers=A), "max_queued_per_key")
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "256x256"}, headers=A)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # Another key is not limited by A's share, but by the whole queue.
        for _ in range(2):
            assert c.post(f"/queue/{EP}", json=BODY, headers=B).status_code == 200
        body = _refused(c.post(f"/queue/{EP}", json=BODY, headers=B), "max_queue_depth")
        assert body["limit"] == "max_queue_depth" and "--max-queue-depth" in body["detail"]
        assert _counter(c, "max_queued_per_key") == per_key0 + 4
        assert _counter(c, "max_queue_depth") == depth0 + 1
        # A cancelled request frees its place.
        rid = c.get("/api/requests", headers=B).json()["requests"][0]["request_id"]
        assert c.put(f"/queue/fal-ai/flux-2/requests/{rid}/cancel", headers=B).status_code == 202
        assert c.post(f"/queue/{EP}", json=BODY, headers=B).status_code == 200


def test_queue_limits_default_on_and_zero_turns_them_off(tmp_path):
    s = make_settings(tmp_path)
    assert s.max_queue_depth > 0 and s.max_queued_per_key > 0
    with TestClient(create_app(make_settings(tmp_path, max_queued_per_key=0, max_queue_depth=0))) as c:
        for _ in range(4):
            assert c.post(f"/queue/{EP}", json=BODY, headers=A).status_code == 200


# ------------------------------------------------------------------------------ 4. storage amplification

@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_cap_is_a_422_naming_the_field(client, field):
    from kleinserve.schema import MAX_PROMPT_CHARS

    assert client.post(f"/queue/{EP}", json={**BODY, field: "a" * MAX_PROMPT_CHARS}, headers=A).status_code == 200
    r = client.post(f"/queue/{EP}", json={**BODY, field: "a" * (MAX_PROMPT_CHARS + 1)}, headers=A)
    assert r.status_code == 422
    d = r.json()["detail"][0]
    assert d["loc"] == ["body", field] and str(MAX_PROMPT_CHARS) in d["msg"]
    r = client.post(f"/queue/{EP}", json={**BODY, field: "a" * (1 << 20)}, headers=A)  # 1 MB: 413 or 422
    assert r.status_code in (413, 422)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_the_recipe_embedded_in_an_image_is_bounded(fmt):
    from PIL import Image

    from kleinserve.engine.imageio import MAX_RECIPE_CHARS, encode_image, read_recipe

    recipe = {"prompt": "p" * 200_000, "negative_prompt": "n" * 200_000, "seed": 3}
    data, _ = encode_image(Image.new("RGB", (64, 64)), fmt, recipe)
    assert len(data) < 3 * MAX_RECIPE_CHARS  # the PNG held the prompt twice: 800 kB
    got = read_recipe(data)
    assert got["truncated"] is True and got["seed"] == 3 and got["prompt"].startswith("ppp")


def test_the_engine_says_when_the_text_encoder_truncates_a_prompt(tiny_engine, caplog):
    from kleinserve.schema import FluxKleinInput

    req = FluxKleinInput(prompt="a red fox in the snow " * 300, num_inference_steps=4,
                         image_size={"width": 64, "height": 64}, enable_safety_checker=False, seed=1)
    with caplog.at_level(logging.WARNING, logger="kleinserve.engine"):
        result = tiny_engine.generate(req)
    notes = [line for line in result.logs if "only the first 512" in line]
    assert notes and "prompt" in notes[0]
    assert any("only the first 512" in r.getMessage() for r in caplog.records)
    short = tiny_engine.generate(req.model_copy(update={"prompt": "a red fox"}))
    assert not [line for line in short.logs if "only the first" in line]


@pytest.mark.parametrize("no_metadata", [False, True])
def test_no_image_metadata_stores_images_without_their_recipe(tmp_path, tiny_engine, no_metadata):
    from kleinserve.engine.imageio import read_recipe

    settings = make_settings(tmp_path, no_image_metadata=no_metadata)
    try:
        with TestClient(create_app(settings, engine=tiny_engine)) as c:
            r = c.post(f"/{EP}", json={**BODY, "prompt": "a secret prompt", "enable_safety_checker": False},
                       headers=A)
            assert r.status_code == 200, r.text
            url = r.json()["images"][0]["url"]
            data = c.get(httpx.URL(url).path, headers=A).content
        recipe = read_recipe(data)
        if no_metadata:
            assert recipe is None and b"a secret prompt" not in data
        else:
            assert recipe["prompt"] == "a secret prompt"
    finally:
        tiny_engine.image_metadata = True  # the engine is shared by the session


# ------------------------------------------------------------------------------ 6. cancel race

def test_after_a_202_cancel_a_result_that_arrives_is_discarded(tmp_path):
    app = create_app(make_settings(tmp_path), start_worker=False)
    with TestClient(app) as c:
        rid = c.post(f"/queue/{EP}", json=BODY, headers=A).json()["request_id"]
        store = app.state.services.store
        claimed = store.claim_next("w-test")
        assert claimed.request_id == rid  # it is running
        r = c.put(f"/queue/fal-ai/flux-2/requests/{rid}/cancel", headers=A)
        assert r.status_code == 202 and r.json()["status"] == "CANCELLATION_REQUESTED"
        assert "completes as cancelled" in r.json()["detail"]
        # The worker finishes its last step after the cancel was recorded and commits a result.
        store.complete_ok(Lease.of(claimed), {"images": [], "seed": 1})
        r = c.get(f"/queue/fal-ai/flux-2/requests/{rid}", headers=A)
        assert r.status_code == 400 and r.json()["error_type"] == "cancelled"
        status = c.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", headers=A).json()
        assert status["status"] == "COMPLETED" and status["error_type"] == "cancelled"


# ------------------------------------------------------------------------------ 5. graceful shutdown

@pytest.fixture
def stoppable(tmp_path):
    """A real uvicorn server (GracefulServer, as `kleinserve serve` runs it) with no engine, so every
    request stays queued; `stoppable.sigterm()` calls what a SIGTERM calls."""
    import signal

    from sse_starlette.sse import AppStatus

    from kleinserve.api.server import GracefulServer
    from service_helpers import ServerThread

    app = create_app(make_settings(tmp_path, shutdown_grace=1.0))
    srv = ServerThread(app)
    srv.server = GracefulServer(srv.server.config)
    srv.start()
    srv.app = app
    srv.sigterm = lambda: srv.server.handle_exit(signal.SIGTERM, None)
    try:
        yield srv
    finally:
        srv.stop()
        AppStatus.should_exit = False  # sse-starlette's flag is process-wide: later tests stream again


def _only_request(app):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = app.state.services.store.list_requests(None)
        if jobs:
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError("no request was submitted")


def test_a_waiting_sync_run_gets_503_with_the_request_id_on_sigterm(stoppable):
    out = {}

    def call():
        out["r"] = httpx.post(f"{stoppable.base_url}/{EP}", json=BODY, headers=A, timeout=60)

    t = threading.Thread(target=call)
    t.start()
    job = _only_request(stoppable.app)
    t0 = time.monotonic()
    stoppable.sigterm()
    t.join(30)
    r = out["r"]
    assert r.status_code == 503, r.text
    assert time.monotonic() - t0 < 10
    assert int(r.headers["retry-after"]) > 0 and r.headers["x-fal-request-id"] == job.request_id
    body = r.json()
    assert body["request_id"] == job.request_id and body["error_type"] == "server_restarting"
    assert body["status_url"].endswith(f"/requests/{job.request_id}/status")
    kept = stoppable.app.state.services.store.get(job.request_id)
    assert kept.status == "IN_QUEUE" and not kept.cancel_requested  # runs after the restart


def test_an_open_stream_ends_with_a_restart_event_and_its_request_is_kept(stoppable):
    events = []
    with httpx.stream("POST", f"{stoppable.base_url}/{EP}/stream", json=BODY, headers=A, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 1:
                    stoppable.sigterm()
    assert events[0]["status"] == "IN_QUEUE"
    last = events[-1]
    rid = events[0]["request_id"]
    assert last["error_type"] == "server_restarting" and last["status_code"] == 503
    assert last["request_id"] == rid and last["status_url"].endswith(f"/requests/{rid}/status")
    kept = stoppable.app.state.services.store.get(rid)
    assert kept.status == "IN_QUEUE" and not kept.cancel_requested


def _wait_running(store, rid, timeout=120.0):
    deadline = time.monotonic() + timeout
    while store.get(rid).status == "IN_QUEUE":
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.02)


@pytest.mark.parametrize("grace", [120.0, 0.0])
def test_running_requests_get_the_shutdown_grace_then_go_back_to_the_queue(tmp_path, tiny_engine, grace):
    from kleinserve.service.sqlite_store import SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    services = build_services(make_settings(tmp_path, shutdown_grace=grace), default_registry(), store=store)
    app = create_app(engine=tiny_engine, services=services)
    slow = {**BODY, "num_inference_steps": 30, "image_size": {"width": 192, "height": 192},
            "enable_safety_checker": False}
    with TestClient(app) as c:
        running = c.post(f"/queue/{EP}", json=slow, headers=A).json()["request_id"]
        _wait_running(store, running)
        app.state.runtime.begin_shutdown()
        later = c.post(f"/queue/{EP}", json=BODY, headers=A).json()["request_id"]
    first, second = store.get(running), store.get(later)
    assert second.status == "IN_QUEUE" and second.attempts == 0  # nothing new was claimed
    if grace:
        assert first.status == "COMPLETED" and first.error is None  # finished within the grace
    else:
        assert first.status == "IN_QUEUE" and first.attempts == 0 and not first.cancel_requested
    store.close()
