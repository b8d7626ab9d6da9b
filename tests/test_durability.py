"""Crash durability: the server (a subprocess on the tiny model) is SIGKILLed while a request runs and
others wait; restarted on the same data directory, every request reaches exactly one terminal state
and nothing is lost. (A request that keeps crashing the server fails as "crashed" instead of looping:
see test_service_api.py::test_startup_recovery_of_a_dead_workers_request, which arranges the same
store state without paying for more server starts.)"""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from service_helpers import start_subprocess_server, wait_for_http

EP = "fal-ai/flux-2/klein/9b/base"
KEY = "durability-key"
H = {"Authorization": f"Key {KEY}"}
SMALL = {"prompt": "a harbour", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4,
         "enable_safety_checker": False}
# Seconds long even single-threaded, so the SIGKILL lands while it runs.
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 20}


def start(data_dir, *extra, port=None):
    return start_subprocess_server(["--model", "tiny", "--device", "cpu", "--api-key", KEY,
                                    "--preview-every", "0", *extra], data_dir=data_dir, port=port, timeout=240)


def submit(base, body, **headers):
    r = httpx.post(f"{base}/queue/{EP}", json=body, headers={**H, **headers}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def status(base, rid, logs=True):
    r = httpx.get(f"{base}/queue/fal-ai/flux-2/requests/{rid}/status", params={"logs": int(logs)},
                  headers=H, timeout=30)
    assert r.status_code in (200, 202), r.text
    return r.json()


def wait_for_step(base, rid, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(base, rid)
        if st["status"] == "IN_PROGRESS" and (st.get("progress") or {}).get("step", 0) >= 1:
            return st
        assert st["status"] != "COMPLETED", f"{rid} finished before the crash: {st}"
        time.sleep(0.1)
    raise AssertionError(f"{rid} never started")


def wait_all_done(base, rids, timeout=400):
    deadline = time.monotonic() + timeout
    pending = set(rids)
    final = {}
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            st = status(base, rid)
            if st["status"] == "COMPLETED":
                final[rid] = st
                pending.discard(rid)
        time.sleep(0.2)
    assert not pending, f"never completed: {pending}"
    return final


def db_rows(data_dir):
    con = sqlite3.connect(str(data_dir / "jobs.sqlite3"))
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT request_id, status, attempts, error FROM jobs")}
    finally:
        con.close()


@pytest.mark.timeout(900)
def test_sigkill_during_generation_loses_nothing(tmp_path):
    data_dir = tmp_path / "data"
    server = start(data_dir)
    try:
        wait_for_http(server.base_url + "/ready", timeout=240, proc=server.proc)
        running = submit(server.base_url, SLOW)
        queued = [submit(server.base_url, {**SMALL, "seed": s}) for s in (1, 2)]
        low = submit(server.base_url, {**SMALL, "seed": 3}, **{"X-Fal-Queue-Priority": "low"})
        cancelled = submit(server.base_url, SMALL)
        r = httpx.put(f"{server.base_url}/queue/fal-ai/flux-2/requests/{cancelled}/cancel", headers=H)
        assert r.status_code == 202
        wait_for_step(server.base_url, running)
    finally:
        server.kill()
    assert server.proc.returncode == -9

    rows = db_rows(data_dir)
    assert rows[running][0] == "IN_PROGRESS"  # mid-flight at the crash
    all_ids = [running, *queued, low, cancelled]

    server = start(data_dir, port=server.port)  # same address: stored file URLs stay valid
    try:
        final = wait_all_done(server.base_url, all_ids)
        st = final[running]
        assert "error" not in st, st
        assert any("re-queued" in line["message"] for line in st["logs"])
        assert [line["message"] for line in st["logs"]].count("step 20/20") == 1
        for rid in (*queued, low):
            assert "error" not in final[rid], final[rid]
            res = httpx.get(f"{server.base_url}/queue/fal-ai/flux-2/requests/{rid}", headers=H, timeout=30)
            assert res.status_code == 200 and res.json()["images"]
        assert final[cancelled]["error_type"] == "cancelled"
        r = httpx.get(f"{server.base_url}/queue/fal-ai/flux-2/requests/{running}", headers=H, timeout=30)
        img = r.json()["images"][0]
        assert (img["width"], img["height"]) == (512, 512)
        assert httpx.get(img["url"], timeout=30).status_code == 200
    finally:
        server.stop()

    rows = db_rows(data_dir)
    assert set(all_ids) <= set(rows)
    assert all(rows[rid][0] == "COMPLETED" for rid in all_ids)
    assert rows[running][1] == 2 and all(rows[rid][1] == 1 for rid in (*queued, low))
    assert rows[cancelled][1] == 0  # never ran


def test_sigterm_answers_a_waiting_sync_run_503_and_keeps_its_request(tmp_path):
    """The real signal path of `kleinserve serve` (issue 10 item 5): a sync run whose generation outlasts
    --shutdown-grace answers 503 with Retry-After and its request id; the request goes back to the
    queue, not cancelled and with no attempt counted."""
    import threading

    data_dir = tmp_path / "data"
    server = start(data_dir, "--shutdown-grace", "1s")
    got = {}

    def sync_run():
        # seconds longer than the 1 s grace, single-threaded
        got["r"] = httpx.post(f"{server.base_url}/{EP}", json={**SLOW, "num_inference_steps": 50}, headers=H,
                              timeout=120)

    t = threading.Thread(target=sync_run)
    try:
        t.start()
        deadline = time.monotonic() + 120
        rid = None
        while rid is None:
            assert time.monotonic() < deadline, "the sync run never started"
            reqs = httpx.get(f"{server.base_url}/api/requests", headers=H, timeout=30).json()["requests"]
            if reqs:
                rid = reqs[0]["request_id"]
            time.sleep(0.1)
        wait_for_step(server.base_url, rid)
        server.stop(timeout=60)  # SIGTERM
        t.join(60)
    finally:
        server.kill()
    r = got["r"]
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0 and r.headers["x-fal-request-id"] == rid
    assert r.json()["request_id"] == rid and r.json()["error_type"] == "server_restarting"
    status, attempts = db_rows(data_dir)[rid][:2]
    assert (status, attempts) == ("IN_QUEUE", 0)
    assert "shutting down" in server.log_text()
