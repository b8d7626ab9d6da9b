"""End to end through the worker with the tiny model: queue, sync run, stream, cancel while running,
failures that must not stop the worker. Small images (64x64), few steps."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.service.jobs import Job, new_request_id
from kleinserve.service.settings import Settings
from service_helpers import serve_app

EP = "fal-ai/flux-2/klein/9b/base"
KEY = "worker-test-key"
H = {"Authorization": f"Key {KEY}"}
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4,
         "enable_safety_checker": False}
# Long enough (seconds even single-threaded) that a client can leave while it is still running.
SLOW = {"image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("svc") / "data", api_keys=[KEY], preview_every=2)
    app = create_app(settings, engine=tiny_engine)
    with serve_app(app) as srv:
        with httpx.Client(base_url=srv.base_url, headers=H, timeout=120) as client:
            srv.client = client
            srv.app = app
            yield srv


def req_path(rid: str, suffix: str = "") -> str:
    return f"/queue/fal-ai/flux-2/requests/{rid}{suffix}"


def wait_done(client, rid, timeout=180.0, with_logs=True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(req_path(rid, "/status"), params={"logs": "1" if with_logs else "0"})
        body = r.json()
        if body["status"] == "COMPLETED":
            assert r.status_code == 200
            return body
        assert r.status_code == 202
        time.sleep(0.1)
    raise AssertionError(f"request {rid} did not complete in {timeout}s")


def wait_progress(client, rid, step=1, timeout=180.0) -> dict:
    """Polls the status until the typed progress reaches `step`; returns that status body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(req_path(rid, "/status")).json()
        if (body.get("progress") or {}).get("step", 0) >= step:
            return body
        if body["status"] == "COMPLETED":
            raise AssertionError(f"{rid} completed before step {step}: {body}")
        time.sleep(0.02)
    raise AssertionError(f"{rid} never reached step {step}")


def wait_log(client, rid, needle, timeout=180.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(req_path(rid, "/status"), params={"logs": 1}).json()
        logs = body.get("logs") or []
        if any(needle in line["message"] for line in logs):
            return logs
        if body["status"] == "COMPLETED":
            raise AssertionError(f"{rid} completed before logging {needle!r}: {body}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the logs of {rid}")


def test_queue_roundtrip_logs_metrics_and_stored_image(server):
    c = server.client
    sub = c.post(f"/queue/{EP}", json={**SMALL, "seed": 1234}).json()
    rid = sub["request_id"]
    # the status stream (with logs) sees IN_PROGRESS with "step i/N" lines, then COMPLETED, then closes
    statuses = []
    with connect_sse(c, "GET", req_path(rid, "/status/stream"), params={"logs": 1}) as es:
        assert es.response.headers["x-fal-request-id"] == rid
        for ev in es.iter_sse():
            statuses.append(ev.json())
    assert statuses[-1]["status"] == "COMPLETED"
    in_progress_logs = [line["message"] for s in statuses if s["status"] == "IN_PROGRESS" for line in s["logs"]]
    assert "step 1/4" in in_progress_logs
    done = wait_done(c, rid)
    messages = [line["message"] for line in done["logs"]]
    assert [m for m in messages if m.startswith("step ")] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert done["metrics"]["inference_time"] > 0 and "error" not in done
    out = c.get(sub["response_url"].replace(server.base_url, ""))
    assert out.status_code == 200 and out.headers["x-fal-request-id"] == rid
    res = out.json()
    assert res["seed"] == 1234 and res["prompt"] == SMALL["prompt"] and res["has_nsfw_concepts"] == [False]
    assert set(res["timings"]) >= {"encode", "denoise", "decode", "total"}
    (img,) = res["images"]
    assert (img["width"], img["height"], img["content_type"]) == (64, 64, "image/png")
    assert img["url"].startswith(server.base_url + "/files/")
    data = httpx.get(img["url"], timeout=30).content
    assert len(data) == img["file_size"]
    assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_sync_run_and_sync_mode_and_seed_drawn_at_submit(server):
    c = server.client
    r = c.post(f"/{EP}", json={**SMALL, "sync_mode": True, "output_format": "png"})
    assert r.status_code == 200, r.text
    rid = r.headers["x-fal-request-id"]
    res = r.json()
    (img,) = res["images"]
    assert img["url"].startswith("data:image/png;base64,")
    raw = base64.b64decode(img["url"].split(",", 1)[1])
    assert len(raw) == img["file_size"] and Image.open(io.BytesIO(raw)).size == (64, 64)
    job = server.app.state.services.store.get(rid)
    assert job.mode == "run" and job.input["seed"] == res["seed"]
    # the same input with the drawn seed reproduces the same pixels
    def pixels(out):
        raw = base64.b64decode(out["images"][0]["url"].split(",", 1)[1])
        return Image.open(io.BytesIO(raw)).convert("RGB").tobytes()

    again = c.post(f"/{EP}", json={**SMALL, "sync_mode": True, "output_format": "png", "seed": res["seed"]}).json()
    assert pixels(again) == pixels(res)


def test_stream_progress_previews_and_output_last(server):
    c = server.client
    events = []
    with connect_sse(c, "POST", f"/{EP}/stream", json={**SMALL, "seed": 7}) as es:
        assert es.response.status_code == 200
        assert es.response.headers["content-type"].startswith("text/event-stream")
        rid = es.response.headers["x-fal-request-id"]
        for ev in es.iter_sse():
            assert ev.id == "" and ev.data
            events.append(ev.json())
    last = events[-1]
    assert set(last) >= {"images", "seed", "has_nsfw_concepts", "prompt", "timings"} and last["seed"] == 7
    progress = [e for e in events[:-1] if "step" in e and e.get("step")]
    assert [e["step"] for e in progress][-1] == 4 and all(e["total"] == 4 for e in progress)
    previews = [e["preview"] for e in progress if e.get("preview")]
    assert previews and previews[0].startswith("data:image/jpeg;base64,")
    assert all(e["request_id"] == rid for e in events[:-1])
    # the stream's request is a normal job too
    assert c.get(req_path(rid, "/status")).json()["status"] == "COMPLETED"


def test_stream_validation_error_is_plain_422(server):
    r = server.client.post(f"/{EP}/stream", json={"prompt": ""})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_cancel_running_stops_at_next_step_and_worker_continues(server):
    c = server.client
    slow = {**SMALL, **SLOW}
    rid = c.post(f"/queue/{EP}", json=slow).json()["request_id"]
    queued = c.post(f"/queue/{EP}", json={**SMALL, "seed": 5}).json()["request_id"]
    wait_progress(c, rid, 1)
    r = c.put(req_path(rid, "/cancel"))
    assert r.status_code == 202 and r.json()["status"] == "CANCELLATION_REQUESTED"
    again = c.put(req_path(rid, "/cancel"))
    assert again.status_code in (202, 400)  # already requested (still running) or already finished
    done = wait_done(c, rid, timeout=120)
    assert done["error_type"] == "cancelled"
    job = server.app.state.services.store.get(rid)
    assert 1 <= job.progress_step < 50 and job.progress_total == 50  # stopped part-way
    res = c.get(req_path(rid))
    assert res.status_code == 400 and res.json()["error_type"] == "cancelled"
    final = c.put(req_path(rid, "/cancel"))
    assert final.status_code == 400 and final.json()["status"] == "ALREADY_COMPLETED"
    # the next job runs normally
    nxt = wait_done(c, queued)
    assert "error" not in nxt
    assert c.get(req_path(queued)).json()["seed"] == 5


def test_failing_job_completes_with_error_and_worker_goes_on(server):
    """A job whose stored input the endpoint rejects (e.g. written by an older version) fails with a
    clear validation error; the worker keeps serving."""
    store = server.app.state.services.store
    bad = store.submit(Job(request_id=new_request_id(), endpoint_id=EP, owner=store.get(
        server.client.post(f"/queue/{EP}", json=SMALL).json()["request_id"]).owner,
        input={"prompt": "", "num_inference_steps": 4}))
    good = server.client.post(f"/queue/{EP}", json=SMALL).json()["request_id"]
    st = wait_done(server.client, bad.request_id)
    assert st["error_type"] == "validation"
    r = server.client.get(req_path(bad.request_id))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["prompt"]
    assert "error" not in wait_done(server.client, good)
    assert server.client.get("/ready").json()["ready"] is True
    assert server.client.get("/ready").json()["is_tiny"] is True


def test_health_answers_during_generation(server):
    c = server.client
    slow = {**SMALL, "image_size": {"width": 192, "height": 192}, "num_inference_steps": 20}
    rid = c.post(f"/queue/{EP}", json=slow).json()["request_id"]
    wait_progress(c, rid, 1)
    t0 = time.monotonic()
    health = c.get("/health").json()
    assert time.monotonic() - t0 < 2.0
    # ... and it says loudly that the weights are random.
    assert health["status"] == "ok" and health["is_tiny"] is True and "tiny" in health["warning"].lower()
    c.put(req_path(rid, "/cancel"))
    wait_done(c, rid)


def test_stream_client_disconnect_cancels_its_job(server):
    c = server.client
    slow = {**SMALL, **SLOW}
    with connect_sse(c, "POST", f"/{EP}/stream", json=slow) as es:
        rid = es.response.headers["x-fal-request-id"]
        for ev in es.iter_sse():
            if ev.json().get("step"):
                break  # leave after the first progress event: the connection closes
    done = wait_done(c, rid, timeout=120)
    assert done["error_type"] == "cancelled"
    assert [line["message"] for line in done["logs"]].count("step 50/50") == 0


def test_sync_run_client_disconnect_cancels_its_job(server):
    # far longer than the client's 2 s read timeout even on an idle machine (the 1+1-block tiny model
    # runs 512x512 x 50 steps in about 2 s)
    slow = {**SMALL, **SLOW, "image_size": {"width": 1024, "height": 1024}}
    with httpx.Client(base_url=server.base_url, headers=H, timeout=httpx.Timeout(30, read=2.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post(f"/{EP}", json=slow)
    store = server.app.state.services.store
    job = next(j for j in store.list_requests(None, 20) if j.mode == "run")
    done = wait_done(server.client, job.request_id, timeout=120)
    assert done["error_type"] == "cancelled"
