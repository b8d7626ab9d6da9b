"""One server, several klein checkpoints (`--model 9b-base=tiny --model 9b=tiny-distilled`): each
family's endpoints are run by its own worker on its own model (the distilled one without CFG), an
unserved family answers 503 naming the flag that enables it, /ready and the playground's schema list
the served families and their state, a small `--model-memory` keeps one model resident and loads the
other on demand, the family form round-trips through the env (the supervisor's path) and a
`kleinserve worker` process serves two families for an API-only replica. Real tiny engines."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.engine.pool import engine_bytes
from kleinserve.schema import FluxKleinDistilledInput, FluxKleinInput
from kleinserve.service.settings import Settings
from kleinserve.service.worker_process import build_parser

BASE = "fal-ai/flux-2/klein/9b/base"
DISTILLED = "fal-ai/flux-2/klein/9b"
TWO = "9b-base=tiny,9b=tiny-distilled"
KEY = "multi-key"
H = {"Authorization": f"Key {KEY}"}
REQ = {"prompt": "a red fox in snow", "seed": 7, "image_size": {"width": 64, "height": 64},
       "num_inference_steps": 4, "enable_safety_checker": False, "sync_mode": True}


def pixels(url_or_bytes) -> np.ndarray:
    data = url_or_bytes if isinstance(url_or_bytes, bytes) else base64.b64decode(url_or_bytes.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def settings(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_keys=[KEY], model=TWO, device="cpu", dtype="float32",
                    no_warmup=True, **kw)


def wait_ready(client: TestClient, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/ready")
        body = r.json()
        if r.status_code == 200 and all(body["workers"].values()):
            return body
        assert body.get("status") != "failed", body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


@pytest.fixture(scope="module")
def distilled_engine():
    from kleinserve.engine import load_engine

    return load_engine("tiny-distilled", device="cpu", dtype="float32")


def test_model_option_takes_the_family_form_and_round_trips_through_the_env():
    args = build_parser().parse_args(["--model", "9b-base=tiny", "--model", "9b=tiny-distilled"])
    s = Settings.from_args(args, env={}, command="worker")
    assert s.model == TWO and s.model_specs == {"9b-base": "tiny", "9b": "tiny-distilled"}
    env = s.to_env("worker")
    assert env["KLEINSERVE_MODEL"] == TWO
    assert Settings.from_sources({}, env=env, command="worker").model_specs == s.model_specs
    # a bare spec is the 9B base family, as before (and stays bare)
    assert Settings.from_sources({"model": ["tiny"]}, env={}).model == "tiny"
    assert Settings.from_sources({"model": ["tiny", "9b=tiny-distilled"]}, env={}).model == TWO
    assert Settings.from_sources({}, env={"KLEINSERVE_MODEL": TWO}).model_specs["9b"] == "tiny-distilled"
    with pytest.raises(ValueError, match="--model: '5b' is not a klein family"):
        Settings.from_sources({"model": ["5b=x"]}, env={})
    with pytest.raises(ValueError, match="KLEINSERVE_MODEL: '9b-base' is given twice"):
        Settings.from_sources({}, env={"KLEINSERVE_MODEL": "tiny,9b-base=tiny"})


def test_one_server_serves_two_families_each_on_its_own_model(tmp_path, tiny_engine, distilled_engine):
    app = create_app(settings(tmp_path), load_engine=True)
    with TestClient(app) as client:
        ready = wait_ready(client)
        fams = ready["families"]
        assert list(fams) == ["9b-base", "9b"]
        assert fams["9b-base"]["state"] == fams["9b"]["state"] == "resident"
        assert fams["9b"]["spec"] == "tiny-distilled" and DISTILLED + "/edit" in fams["9b"]["endpoints"]
        assert fams["9b-base"]["workers"] == fams["9b"]["workers"] == 1
        assert set(ready["unserved"]) == {"4b-base", "4b"} and "--model 4b=" in ready["unserved"]["4b"]
        runtime = app.state.runtime
        assert sorted(w.registry.engines()[0] for w in runtime.workers) == ["9b", "9b-base"]
        # each worker registered with its own endpoints only
        live = app.state.services.store.live_workers()
        assert live[BASE] == 1 and live[DISTILLED] == 1 and live.get("fal-ai/flux-2/klein/4b", 0) == 0

        base = client.post(f"/{BASE}", json={**REQ, "guidance_scale": 4.0}, headers=H)
        dist = client.post(f"/{DISTILLED}", json=REQ, headers=H)
        assert base.status_code == 200 and dist.status_code == 200, (base.text, dist.text)
        got_base, got_dist = pixels(base.json()["images"][0]["url"]), pixels(dist.json()["images"][0]["url"])
        req = {k: v for k, v in REQ.items() if k != "sync_mode"}
        want_base = tiny_engine.generate(FluxKleinInput(**req, guidance_scale=4.0)).images[0].data
        want_dist = distilled_engine.generate(FluxKleinDistilledInput(**req)).images[0].data
        np.testing.assert_array_equal(got_base, pixels(want_base))
        np.testing.assert_array_equal(got_dist, pixels(want_dist))  # the distilled model, no CFG
        assert not np.array_equal(got_base, got_dist)

        r = client.post("/fal-ai/flux-2/klein/4b", json=REQ, headers=H)
        assert r.status_code == 503 and "--model 4b=" in r.json()["detail"]

        schema = client.get("/api/schema").json()
        assert {e["family"] for e in schema["endpoints"]} == {"9b-base", "9b"}
        assert schema["families"]["9b"]["title"] == "FLUX.2 [klein] 9B"
        assert schema["families"]["9b"]["state"] == "resident" and "4b" in schema["unserved"]


def test_a_small_budget_keeps_one_model_and_loads_the_other_on_demand(tmp_path, tiny_engine):
    budget = int(engine_bytes(tiny_engine) * 1.5)  # room for one tiny model
    app = create_app(settings(tmp_path, model_memory=budget), load_engine=True)
    with TestClient(app) as client:
        ready = wait_ready(client)
        # startup loads in --model order until the budget is full: 9b evicted 9b-base
        assert ready["families"]["9b"]["state"] == "resident"
        assert ready["families"]["9b-base"]["state"] == "not_loaded"
        pool = app.state.runtime.pool
        assert pool.evictions == ["9b-base"]
        r = client.post(f"/queue/{BASE}", json={**REQ, "sync_mode": False}, headers=H)
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        deadline = time.monotonic() + 120
        while True:
            st = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", params={"logs": 1}, headers=H).json()
            if st["status"] == "COMPLETED":
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        messages = [line["message"] for line in st["logs"]]
        assert any("Loading the model 'tiny'" in m for m in messages), messages
        assert any(m.startswith("Model loaded in") for m in messages), messages
        assert pool.loaded() == ["9b-base"] and pool.evictions == ["9b-base", "9b"]
        fams = client.get("/ready").json()["families"]
        assert fams["9b-base"]["state"] == "resident" and fams["9b"]["state"] == "not_loaded"
        # and back: the distilled endpoint loads its model again
        dist = client.post(f"/{DISTILLED}", json=REQ, headers=H)
        assert dist.status_code == 200 and pool.loaded() == ["9b"] and pool.loads == 4


def test_a_worker_process_serves_two_families_for_an_api_replica(tmp_path):
    data = tmp_path / "data"
    store = f"sqlite:///{(tmp_path / 'jobs.sqlite3').resolve()}"
    api = create_app(Settings(data_dir=data, api_keys=[KEY], model=TWO, role="api", store=store))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEINSERVE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kleinserve", "worker", "--model", "9b-base=tiny",
                                 "--model", "9b=tiny-distilled", "--store", store, "--data-dir", str(data),
                                 "--device", "cpu", "--dtype", "float32", "--no-warmup", "--threads", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with TestClient(api) as client:
            ids = [client.post(f"/queue/{eid}", json={**REQ, "sync_mode": False}, headers=H).json()["request_id"]
                   for eid in (BASE, DISTILLED)]
            deadline = time.monotonic() + 180
            for rid in ids:
                while True:
                    st = client.get(f"/queue/fal-ai/flux-2/requests/{rid}/status", headers=H).json()
                    if st["status"] == "COMPLETED":
                        break
                    assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                    assert time.monotonic() < deadline, st
                    time.sleep(0.3)
            ready = client.get("/ready").json()
            assert ready["families"]["9b-base"]["workers"] == 1 and ready["families"]["9b"]["workers"] == 1
            assert "state" not in ready["families"]["9b"]  # an API replica runs no model
            out = client.get(f"/queue/fal-ai/flux-2/requests/{ids[1]}", headers=H).json()
            assert out["images"][0]["width"] == 64
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()
