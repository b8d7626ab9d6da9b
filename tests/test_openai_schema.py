"""The OpenAI route documents itself (/openapi.json has its request and response schemas) and answers
bad input in OpenAI's terms, through the official `openai` package."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

KEY = "openai-schema-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("openai-schema") / "data", api_keys=[KEY])
    with serve_app(create_app(settings, start_worker=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openapi_has_the_request_and_response_schemas(server):
    op = httpx.get(server.base_url + "/openapi.json").json()["paths"]["/v1/images/generations"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["prompt"]
    assert {"prompt", "n", "size", "response_format", "output_format"} <= set(body["properties"])
    assert "64..2048" in body["properties"]["size"]["description"]
    assert body["properties"]["response_format"]["enum"] == ["b64_json", "url"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"created", "data"} <= set(ok["properties"])
    err = op["responses"]["400"]["content"]["application/json"]["schema"]
    assert set(err["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}
    assert "Bearer" in op["responses"]["401"]["description"]


@pytest.mark.parametrize("size, words", [
    ("13x13", ["'13x13'", "width 13 and height 13 out of range", "64..2048"]),
    ("4096x512", ["width 4096 out of range"]),
    ("big", ["Invalid size 'big'", "'WIDTHxHEIGHT'", "landscape_4_3"]),
])
def test_bad_size_is_a_clear_400_about_size(client, size, words):
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", size=size)
    err = exc.value.body
    assert err["param"] == "size" and err["code"] == "invalid_size" and exc.value.status_code == 400
    for w in words:
        assert w in err["message"], err["message"]
    assert "literal" not in err["message"] and "ImageSize" not in err["message"]


def test_endpoint_fields_errors_name_each_parameter(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", extra_body={"num_inference_steps": 500, "guidance_scale": 99})
    msg = exc.value.body["message"]
    assert "num_inference_steps: must be 4..50 (got 500)" in msg and "guidance_scale: must be 0.0..20.0 (got 99)" in msg
