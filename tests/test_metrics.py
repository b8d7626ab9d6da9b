"""Observability: /metrics reflects a generated request, /health answers during a slow generation,
logs are one JSON object a line carrying the request id.

One live server for the module (uvicorn on 127.0.0.1, the tiny model, the worker thread in-process as
in `kleinserve serve`); its kleinserve logs are captured through the JSON formatter.
"""

from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kleinserve.api.app import create_app
from kleinserve.service.logging import JsonFormatter, RequestIdFilter
from kleinserve.service.settings import Settings
from service_helpers import serve_app

KEY = "metrics-test-key"
EP = "fal-ai/flux-2/klein/9b/base"
AUTH = {"Authorization": f"Key {KEY}"}


@pytest.fixture(scope="module")
def json_logs():
    """Every `kleinserve.*` record while the module runs, formatted as JSON lines."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("kleinserve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory, json_logs):
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics") / "data", api_keys=[KEY])
    with serve_app(create_app(settings, engine=tiny_engine)) as srv:
        yield srv


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample on /metrics."""
    r = httpx.get(server.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(server, body: dict) -> dict:
    r = httpx.post(f"{server.base_url}/queue/{EP}", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(server, handle: dict, want: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(handle["status_url"], headers=AUTH, timeout=10).json()
        if st["status"] == want or st["status"] == "COMPLETED":
            return st
        time.sleep(0.1)
    raise AssertionError(f"request did not reach {want} within {timeout}s: {st}")


def test_metrics_reflect_a_generated_request(server):
    before = scrape(server)
    handle = submit(server, {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64},
                             "num_inference_steps": 4, "num_images": 2, "output_format": "jpeg"})
    st = wait_status(server, handle, "COMPLETED")
    assert st["status"] == "COMPLETED" and "error" not in st
    r = httpx.get(handle["response_url"], headers=AUTH, timeout=10)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    after = scrape(server)

    submit_route = f"/queue/{EP}"
    assert val(after, "kleinserve_http_requests_total", endpoint=submit_route, method="POST", status="200") \
        == val(before, "kleinserve_http_requests_total", endpoint=submit_route, method="POST", status="200") + 1
    status_route = "/queue/fal-ai/flux-2/requests/{request_id}/status"
    assert val(after, "kleinserve_http_requests_total", endpoint=status_route, method="GET", status="200") >= 1
    assert val(after, "kleinserve_jobs_submitted_total", endpoint_id=EP, priority="normal") \
        == val(before, "kleinserve_jobs_submitted_total", endpoint_id=EP, priority="normal") + 1
    assert val(after, "kleinserve_jobs_completed_total", outcome="ok", error_type="") \
        == val(before, "kleinserve_jobs_completed_total", outcome="ok", error_type="") + 1
    for stage in ("encode", "denoise", "decode", "total"):
        assert val(after, "kleinserve_inference_seconds_count", stage=stage) \
            == val(before, "kleinserve_inference_seconds_count", stage=stage) + 1, stage
    assert val(after, "kleinserve_inference_seconds_sum", stage="total") \
        > val(before, "kleinserve_inference_seconds_sum", stage="total")
    assert val(after, "kleinserve_images_generated_total", format="jpeg") \
        == val(before, "kleinserve_images_generated_total", format="jpeg") + 2
    assert val(after, "kleinserve_queue_wait_seconds_count") == val(before, "kleinserve_queue_wait_seconds_count") + 1
    assert val(after, "kleinserve_denoising_steps_total") >= val(before, "kleinserve_denoising_steps_total") + 4
    # present even when zero / not on CUDA
    assert ("kleinserve_nsfw_flags_total", ()) in after
    assert ("kleinserve_queue_depth", (("status", "IN_QUEUE"),)) in after
    assert val(after, "kleinserve_model_load_seconds") > 0
    assert val(after, "kleinserve_model_info", device="cpu", dtype="float32", is_tiny="true", source="tiny",
               spec="tiny") == 1 or any(k[0] == "kleinserve_model_info" for k in after)


def test_errors_by_type(server):
    before = scrape(server)
    r = httpx.post(f"{server.base_url}/queue/{EP}", json={"prompt": "x"}, headers={"Authorization": "Key wrong"})
    assert r.status_code == 401
    r = httpx.post(f"{server.base_url}/queue/{EP}", json={"prompt": "x", "num_images": 9}, headers=AUTH)
    assert r.status_code == 422
    after = scrape(server)
    assert val(after, "kleinserve_errors_total", type="auth") == val(before, "kleinserve_errors_total", type="auth") + 1
    assert val(after, "kleinserve_errors_total", type="validation") \
        == val(before, "kleinserve_errors_total", type="validation") + 1
    assert val(after, "kleinserve_http_requests_total", endpoint=f"/queue/{EP}", method="POST", status="422") >= 1


def test_health_answers_during_a_slow_generation(server):
    before = scrape(server)
    handle = submit(server, {"prompt": "slow", "image_size": "square_hd", "num_inference_steps": 50,
                             "guidance_scale": 5.0, "num_images": 2})
    st = wait_status(server, handle, "IN_PROGRESS")
    assert st["status"] == "IN_PROGRESS", st
    try:
        for _ in range(5):
            t0 = time.monotonic()
            r = httpx.get(server.base_url + "/health", timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert time.monotonic() - t0 < 2.0, "/health was slow while a generation ran"
            time.sleep(0.1)
        mid = scrape(server)
        # (>=: the metrics registry is per process, other tests' servers may share it)
        assert val(mid, "kleinserve_jobs_in_progress") >= val(before, "kleinserve_jobs_in_progress") + 1
        assert val(mid, "kleinserve_queue_depth", status="IN_PROGRESS") == 1
        still = httpx.get(handle["status_url"], headers=AUTH, timeout=10).json()
        assert still["status"] == "IN_PROGRESS", "the generation finished too fast to prove anything"
    finally:
        httpx.put(handle["cancel_url"], headers=AUTH, timeout=10)
    done = wait_status(server, handle, "COMPLETED")
    assert done.get("error_type") == "cancelled", done
    deadline = time.monotonic() + 5  # the gauge drops just after the job is marked COMPLETED
    while True:
        after = scrape(server)
        if val(after, "kleinserve_jobs_in_progress") == val(before, "kleinserve_jobs_in_progress") \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert val(after, "kleinserve_jobs_in_progress") == val(before, "kleinserve_jobs_in_progress")
    assert val(after, "kleinserve_jobs_completed_total", outcome="error", error_type="cancelled") \
        == val(before, "kleinserve_jobs_completed_total", outcome="error", error_type="cancelled") + 1
    assert val(after, "kleinserve_errors_total", type="cancelled") \
        == val(before, "kleinserve_errors_total", type="cancelled") + 1


def test_json_logs_carry_the_request_id(server, json_logs):
    handle = submit(server, {"prompt": "logs", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4})
    wait_status(server, handle, "COMPLETED")
    rid = handle["request_id"]
    deadline = time.monotonic() + 5
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
        if any(r.get("request_id") == rid and "completed" in r.get("msg", "") for r in records):
            break
        time.sleep(0.2)
    mine = [r for r in records if r.get("request_id") == rid]
    assert mine, "no log record carries the request id"
    assert any(r["logger"].startswith("kleinserve.api") for r in mine), mine  # the HTTP layer
    assert any(r["logger"] == "kleinserve.service.worker" for r in mine), mine  # the worker thread
    for r in mine:
        assert {"ts", "level", "logger", "msg"} <= set(r)


def test_json_formatter_unit():
    from kleinserve.service.logging import JsonFormatter, RequestIdFilter, request_context

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("kleinserve.test_json_formatter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside")
        with request_context("req-123"):
            logger.info("inside %d", 7, extra={"steps": 4})
    finally:
        logger.removeHandler(handler)
    a, b = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert "request_id" not in a and a["msg"] == "outside"
    assert b["request_id"] == "req-123" and b["msg"] == "inside 7" and b["steps"] == 4 and b["level"] == "INFO"


def test_gpu_memory_is_reported_when_torch_uses_cuda(monkeypatch):
    """The collector reads torch.cuda only when torch is already imported and CUDA is initialised."""
    import sys
    import types

    from kleinserve.service import metrics

    cuda = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 1,
        memory_allocated=lambda i: 3 * 2**30, memory_reserved=lambda i: 4 * 2**30,
        max_memory_allocated=lambda i: 5 * 2**30,
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    text = metrics.render().decode()
    assert 'kleinserve_gpu_memory_allocated_bytes{device="cuda:0"} 3.221225472e+09' in text
    assert 'kleinserve_gpu_memory_reserved_bytes{device="cuda:0"}' in text
    assert 'kleinserve_gpu_memory_total_bytes{device="cuda:0"}' in text
    cuda.is_available = lambda: False
    assert "kleinserve_gpu_memory" not in metrics.render().decode()
