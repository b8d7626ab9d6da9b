"""The edit and LoRA endpoints over HTTP (uvicorn on 127.0.0.1, the tiny model): their images match
diffusers' Flux2KleinPipeline within 2/255, inputs come from our own storage and data: URIs, bad inputs
are 422s naming the item, a LoRA leaves no trace on later base requests, and the logs say which
adapters ran.

Written against the composition-root API (app.state.services, service/runtime.py) of the main line:
it runs once this branch is merged there (verified in a trial merge)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.service.settings import Settings
from service_helpers import serve_app

KEY = "family-test-key"
H = {"Authorization": f"Key {KEY}"}
BASE = "fal-ai/flux-2/klein/9b/base"
PROMPT = "the same scene at night"


@pytest.fixture(scope="module")
def engine():
    """Its own tiny engine: LoRA adapters loaded into it stay (disabled) in its transformer."""
    from kleinserve.engine import load_engine

    return load_engine("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import Flux2KleinPipeline

    p = Flux2KleinPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("family") / "data", api_keys=[KEY])
    app = create_app(settings, engine=engine)
    with serve_app(app) as srv:
        srv.storage = app.state.services.storage
        yield srv


def png(seed: int, width: int, height: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def run(server, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{endpoint}", json=body, headers=H, timeout=120)


def image_of(server, output: dict) -> np.ndarray:
    url = output["images"][0]["url"]
    data = httpx.get(url, timeout=30).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def as_8bit(reference: np.ndarray) -> np.ndarray:
    return (reference[0] * 255).round().astype(np.int16)


COMMON = dict(negative_prompt="", num_inference_steps=4, seed=13, enable_safety_checker=False, enable_cns=False)


def test_edit_endpoint_matches_the_pipeline(server, pipe):
    first, second = png(1, 101, 75), png(2, 80, 96)
    stored = server.storage.put(first, "image/png", "first.png")
    body = dict(prompt=PROMPT, guidance_scale=4.0, image_urls=[stored.url(server.base_url), data_uri(second)],
                **COMMON)
    r = run(server, f"{BASE}/edit", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (96, 64)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in (first, second)]
    reference = pipe(prompt=PROMPT, image=images, num_inference_steps=4, guidance_scale=4.0,
                     generator=torch.Generator("cpu").manual_seed(13), output_type="np").images
    assert np.abs(image_of(server, out) - as_8bit(reference)).max() <= 2


@pytest.mark.parametrize("urls,loc,needle", [
    (["DATA", "OWN_MISSING"], 1, "image_urls[1]: no such uploaded file"),
    (["data:text/plain;base64,aGVsbG8="], 0, "image_urls[0]: not an image"),
    (["DATA", "DATA", "data:image/png;base64,@@"], 2, "image_urls[2]: not a valid data: URI"),
])
def test_bad_images_are_422_naming_the_item(server, urls, loc, needle):
    urls = [u.replace("OWN_MISSING", f"{server.base_url}/files/{'0' * 32}/gone.png")
             .replace("DATA", data_uri(png(3, 64, 64))) for u in urls]
    r = run(server, f"{BASE}/edit", dict(prompt="x", image_urls=urls, **COMMON))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", "image_urls", loc]
    assert needle in detail[0]["msg"]


def test_edit_requires_images(server):
    r = run(server, f"{BASE}/edit", dict(prompt="x"))
    assert r.status_code == 422
    assert any(e["loc"][-1] == "image_urls" for e in r.json()["detail"])


def test_lora_endpoint_matches_load_lora_weights_and_leaves_no_trace(server, pipe, tmp_path):
    body = dict(prompt="a red fox", guidance_scale=3.0, image_size={"width": 64, "height": 64}, **COMMON)
    base_before = run(server, BASE, body)
    assert base_before.status_code == 200, base_before.text

    lora = save_tiny_lora(tmp_path / "style.safetensors", layout="kohya")
    stored = server.storage.put(lora.read_bytes(), "application/octet-stream", "style.safetensors")
    loras = [{"path": stored.url(server.base_url), "scale": 0.7}]
    r = run(server, f"{BASE}/lora", {**body, "loras": loras})
    assert r.status_code == 200, r.text
    pipe.load_lora_weights(str(lora), adapter_name="parity")
    pipe.set_adapters(["parity"], [0.7])
    try:
        reference = pipe(prompt="a red fox", height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
                         generator=torch.Generator("cpu").manual_seed(13), output_type="np").images
    finally:
        pipe.unload_lora_weights()
    ours = image_of(server, r.json())
    assert np.abs(ours - as_8bit(reference)).max() <= 2
    before = image_of(server, base_before.json())
    assert np.abs(ours - before).max() > 20

    base_after = run(server, BASE, body)
    assert np.array_equal(image_of(server, base_after.json()), before)

    # the queue: the logs say which adapter ran
    sub = httpx.post(f"{server.base_url}/queue/{BASE}/lora", json={**body, "loras": loras}, headers=H).json()
    deadline = time.monotonic() + 60
    while True:
        st = httpx.get(f"{server.base_url}/queue/fal-ai/flux-2/requests/{sub['request_id']}/status?logs=1",
                       headers=H).json()
        if st["status"] == "COMPLETED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    messages = [entry["message"] for entry in st["logs"]]
    assert any("style.safetensors (scale 0.7)" in m and "already in memory" in m for m in messages), "\n".join(messages)


def test_bad_lora_is_422_naming_the_problem(server, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "not-a-lora.safetensors"
    save_file({"transformer.x_embedder.weight": torch.zeros(2, 2)}, str(path))
    stored = server.storage.put(path.read_bytes(), "application/octet-stream", "not-a-lora.safetensors")
    body = dict(prompt="x", image_size={"width": 64, "height": 64}, **COMMON)
    r = run(server, f"{BASE}/lora", {**body, "loras": [{"path": stored.url(server.base_url)}]})
    assert r.status_code == 422, r.text
    assert "not a LoRA" in r.json()["detail"][0]["msg"]
    r = run(server, f"{BASE}/lora", {**body, "loras": [{"path": "../../etc/passwd"}]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "loras", 0]
    r = run(server, f"{BASE}/lora", {**body, "loras": [{"path": "a"}] * 4})
    assert r.status_code == 422  # at most 3
