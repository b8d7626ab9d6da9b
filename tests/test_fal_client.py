"""The REAL, unmodified Python `fal_client` against our server over TLS on 127.0.0.1.

The server runs in this process (uvicorn thread, self-signed certificate for 127.0.0.1/localhost);
the client runs in a fresh interpreter because it reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST / FAL_KEY
at import time. One client script exercises everything and prints a JSON report; the tests below
each check one part of it.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import fal_client_env, make_self_signed_cert, run_fal_client_script, serve_app

pytest.importorskip("fal_client")

KEY = "fal-client-test-key"

CLIENT_SCRIPT = textwrap.dedent(
    r'''
    import asyncio, json, sys, time, traceback
    import fal_client
    from fal_client import Completed, FalClientHTTPError, InProgress, Queued

    EP = "fal-ai/flux-2/klein/9b/base"
    SMALL = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64},
             "num_inference_steps": 4, "enable_safety_checker": False}
    SLOW = {**SMALL, "image_size": {"width": 768, "height": 768}, "num_inference_steps": 50}
    report = {}

    def step(name):
        def deco(fn):
            try:
                report[name] = {"ok": True, "value": fn()}
            except BaseException as e:
                report[name] = {"ok": False, "error": repr(e), "type": type(e).__name__,
                                "status": getattr(e, "status_code", None), "tb": traceback.format_exc()}
            return fn
        return deco

    def kind(s):
        return type(s).__name__

    @step("subscribe")
    def _():
        updates = []
        def on_update(s):
            updates.append({"type": kind(s), "logs": [l["message"] for l in (getattr(s, "logs", None) or [])]})
        res = fal_client.subscribe(EP, arguments={**SMALL, "seed": 11}, with_logs=True, on_queue_update=on_update)
        return {"result": res, "updates": updates}

    @step("run")
    def _():
        return fal_client.run(EP, arguments={**SMALL, "seed": 12})

    @step("readme_example")
    def _():
        # README's quick-start call, exactly (the endpoint's defaults: 1024x768, 28 steps), printing
        # every queue update as the README does; what a new user sees is measured.
        import contextlib, io
        printed = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(printed):
            out = fal_client.subscribe("fal-ai/flux-2/klein/9b/base",
                                       arguments={"prompt": "a lighthouse at dusk", "negative_prompt": "blurry"},
                                       with_logs=True, on_queue_update=print)
        return {"bytes": len(printed.getvalue()), "lines": printed.getvalue().count("\n"),
                "seconds": time.monotonic() - t0, "width": out["images"][0]["width"]}

    @step("stream")
    def _():
        return list(fal_client.stream(EP, arguments={**SMALL, "seed": 13}))

    @step("submit_status_result")
    def _():
        h = fal_client.submit(EP, arguments={**SMALL, "seed": 14}, priority="low")
        first = h.status(with_logs=True)
        kinds = [kind(s) for s in h.iter_events(with_logs=True, interval=0.1)]
        res = h.get()
        st = fal_client.status(EP, h.request_id, with_logs=True)
        res2 = fal_client.result(EP, h.request_id)
        async def async_part():
            c = fal_client.AsyncClient()
            s = await c.status(EP, h.request_id, with_logs=True)
            r = await c.result(EP, h.request_id)
            return kind(s), r["seed"]
        return {"first": kind(first), "kinds": kinds, "seed": res["seed"], "same": res == res2,
                "completed_metrics": st.metrics, "completed_logs": [l["message"] for l in st.logs],
                "async": asyncio.run(async_part()), "request_id": h.request_id}

    @step("timeout_and_cancel")
    def _():
        slow = fal_client.submit(EP, arguments=SLOW)
        # wait until the slow one runs, so the next one has to wait in the queue
        for s in slow.iter_events(with_logs=True, interval=0.1):
            if isinstance(s, InProgress) and any(l["message"].startswith("step ") for l in (s.logs or [])):
                break
            if isinstance(s, Completed):
                raise AssertionError("the slow request finished too early")
        t0 = time.monotonic()
        try:
            fal_client.subscribe(EP, arguments=SMALL, start_timeout=2)
            timeout = {"raised": None}
        except FalClientHTTPError as e:
            timeout = {"raised": e.status_code, "error_type": e.error_type,
                       "header": e.response_headers.get("x-fal-request-timeout-type"),
                       "seconds": time.monotonic() - t0, "message": str(e)}
        slow.cancel()
        final = None
        for s in slow.iter_events(with_logs=True, interval=0.1):
            final = s
        try:
            slow.get()
            result = {"raised": None}
        except FalClientHTTPError as e:
            result = {"raised": e.status_code, "error_type": e.error_type}
        try:
            slow.cancel()
            again = {"raised": None}
        except FalClientHTTPError as e:
            again = {"raised": e.status_code, "message": str(e)}
        return {"timeout": timeout, "final": kind(final), "final_error_type": final.error_type,
                "steps": [l["message"] for l in final.logs if l["message"].startswith("step ")],
                "result": result, "cancel_again": again}

    @step("validation")
    def _():
        out = {}
        for name, fn in (("submit", fal_client.submit), ("run", fal_client.run)):
            try:
                fn(EP, arguments={"prompt": "", "num_inference_steps": 2})
                out[name] = {"raised": None}
            except FalClientHTTPError as e:
                out[name] = {"raised": e.status_code, "message": str(e)}
        return out

    @step("bad_key")
    def _():
        try:
            fal_client.SyncClient(key="wrong").run(EP, arguments=SMALL)
            return {"raised": None}
        except FalClientHTTPError as e:
            return {"raised": e.status_code, "message": str(e)}

    print("REPORT " + json.dumps(report))
    '''
)


@pytest.fixture(scope="module")
def report(tiny_engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("falclient")
    cert, key = make_self_signed_cert(tmp / "tls")
    settings = Settings(data_dir=tmp / "data", api_keys=[KEY], preview_every=2)
    app = create_app(settings, engine=tiny_engine)
    with serve_app(app, ssl_cert=cert, ssl_key=key) as srv:
        proc = run_fal_client_script(CLIENT_SCRIPT, fal_client_env(srv.host_port, KEY, cert), timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"client script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def ok(report, name):
    entry = report[name]
    assert entry["ok"], f"{name} raised {entry['error']}\n{entry.get('tb', '')}"
    return entry["value"]


def check_output(res, seed):
    assert res["seed"] == seed
    (img,) = res["images"]
    assert (img["width"], img["height"]) == (64, 64) and img["url"].startswith("https://127.0.0.1:")
    assert res["has_nsfw_concepts"] == [False] and res["prompt"] == "a lighthouse"


def test_subscribe_with_logs_and_queue_updates(report):
    v = ok(report, "subscribe")
    check_output(v["result"], 11)
    kinds = [u["type"] for u in v["updates"]]
    assert kinds[-1] == "Completed" and ("InProgress" in kinds or "Queued" in kinds)
    logs = [m for u in v["updates"] for m in u["logs"]]
    assert "step 4/4" in logs


def test_readme_example_prints_a_readable_amount(report):
    """Issue 11 point 10: `on_queue_update=print` once printed ~900 KB for one image (every status
    update repeats every log line, and there was one line per step). Steps now log at each quarter
    (the typed progress is what streams use), so the README's example prints a screenful."""
    v = ok(report, "readme_example")
    assert v["width"] == 1024
    # ~24 KB, ~60 updates in 6 s measured here (the client polls the status every 0.1 s); one log line
    # per step made it ~0.9 MB
    assert v["bytes"] < 60_000, v


def test_run(report):
    check_output(ok(report, "run"), 12)


def test_stream(report):
    events = ok(report, "stream")
    check_output(events[-1], 13)
    assert any(e.get("step") == 4 and e.get("total") == 4 for e in events[:-1])


def test_submit_status_result(report):
    v = ok(report, "submit_status_result")
    assert v["first"] in ("Queued", "InProgress", "Completed")
    assert v["kinds"][-1] == "Completed"
    assert v["seed"] == 14 and v["same"]
    assert v["completed_metrics"]["inference_time"] > 0
    assert "step 4/4" in v["completed_logs"]
    assert v["async"] == ["Completed", 14]


def test_start_timeout_504_and_cancel_running(report):
    v = ok(report, "timeout_and_cancel")
    t = v["timeout"]
    assert t["raised"] == 504 and t["header"] == "user" and t["error_type"] == "timeout", t
    assert t["seconds"] < 30  # not retried by the client
    assert v["final"] == "Completed" and v["final_error_type"] == "cancelled"
    assert v["steps"] and v["steps"][-1] != "step 50/50"
    assert v["result"]["raised"] == 400 and v["result"]["error_type"] == "cancelled"
    assert v["cancel_again"]["raised"] == 400 and "already cancelled" in v["cancel_again"]["message"]


def test_validation_error_raises(report):
    v = ok(report, "validation")
    for name in ("submit", "run"):
        assert v[name]["raised"] == 422, v
        assert "prompt" in v[name]["message"]


def test_bad_key_raises_401(report):
    v = ok(report, "bad_key")
    assert v["raised"] == 401 and "Invalid API key" in v["message"]
