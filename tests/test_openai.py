"""The official `openai` Python package against a live kleinserve server (uvicorn on 127.0.0.1, the
tiny model), pointed at it with `base_url` only: POST /v1/images/generations with b64_json and url,
n, sizes, errors."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

KEY = "openai-test-key"
FAST = {"num_inference_steps": 4}  # extra_body: any field of the endpoint's input passes through


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("openai") / "data", api_keys=[KEY])
    with serve_app(create_app(settings, engine=tiny_engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=180)


def test_b64_json_is_the_default_and_decodes_to_png_of_the_size(client):
    res = client.images.generate(prompt="a red fox in the snow", size="96x64", extra_body=FAST)
    assert isinstance(res.created, int) and res.created > 0
    assert len(res.data) == 1
    item = res.data[0]
    assert item.url is None and item.b64_json
    im = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert im.format == "PNG" and im.size == (96, 64)
    assert res.size == "96x64" and res.output_format == "png"
    assert item.revised_prompt == "a red fox in the snow"


def test_url_response_downloads_back(client, server):
    res = client.images.generate(prompt="a lighthouse", size="64x80", response_format="url", extra_body=FAST)
    url = res.data[0].url
    assert url and url.startswith(server.base_url + "/files/") and res.data[0].b64_json is None
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 80)


def test_n_2_and_output_format(client):
    res = client.images.generate(prompt="two cats", n=2, size="64x64", output_format="jpeg",
                                 extra_body={**FAST, "seed": 7})
    assert len(res.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert all(im.format == "JPEG" and im.size == (64, 64) for im in images)
    assert res.data[0].b64_json != res.data[1].b64_json  # image k uses seed + k


def test_size_is_rounded_to_a_multiple_of_16(client):
    res = client.images.generate(prompt="rounding", size="70x100", extra_body=FAST)
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (64, 96)
    assert res.size == "64x96"


@pytest.mark.parametrize("size", ["big", "4096x64", "0x64", "64"])
def test_bad_size_is_a_bad_request(client, size):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size=size, extra_body=FAST)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "size" and body["message"]


@pytest.mark.parametrize("n", [0, 5])
def test_bad_n_is_a_bad_request(client, n):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", n=n, size="64x64", extra_body=FAST)
    assert err.value.body["param"] == "n"


def test_other_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="", size="64x64")
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="64x64", response_format="jpg")  # type: ignore[arg-type]
    assert err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="64x64", extra_body={"num_inference_steps": 500})
    assert err.value.body["param"] == "num_inference_steps"


def test_wrong_key_is_an_authentication_error(server):
    bad = OpenAI(base_url=f"{server.base_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.images.generate(prompt="x", size="64x64")
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key" and err.value.body["type"] == "invalid_request_error"


def test_error_shape_on_the_wire(server):
    r = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "x", "n": 9},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.base_url}/v1/images/generations", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "fal-ai/flux-2/klein/9b/base" in ids


def test_model_that_failed_to_load_answers_in_openai_shape(tmp_path):
    import time

    from fastapi.testclient import TestClient

    settings = Settings(data_dir=tmp_path / "data", api_keys=[KEY], model=str(tmp_path / "no-such-model"))
    with TestClient(create_app(settings, load_engine=True)) as c:
        deadline = time.monotonic() + 60
        while c.get("/ready").json().get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "server_error"
    assert "failed to load" in r.json()["error"]["message"]
