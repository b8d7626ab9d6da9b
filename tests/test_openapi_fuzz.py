"""Schemathesis over every operation of /openapi.json (issue 10 item 9): no server error, every status
code documented, every body matching its documented schema. The server runs on 127.0.0.1 with a model
that failed to load, so submits answer at once (503) instead of generating; bounded to a few examples
per operation (well under 3 minutes in all)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "fuzz-key"


@schemathesis.check
def no_server_error(ctx, response, case):
    """No 500 (nor any 5xx but the documented 503 of a server whose model failed to load: that is this
    fixture's state, on purpose, so that submits answer at once)."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")
    if response.status_code == 503 and "detail" not in (response.json() if response.text else {}) \
            and "error" not in (response.json() if response.text else {}):
        raise AssertionError(f"503 without an explanation: {response.text[:300]}")


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from kleinserve.api.app import create_app
    from kleinserve.service.settings import Settings
    from service_helpers import serve_app, wait_for_http

    d = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(data_dir=d / "data", api_keys=[KEY], model=str(d / "no-such-model"),
                              max_request_bytes=256 * 1024), load_engine=True)
    with serve_app(app) as srv:
        wait_for_http(srv.base_url + "/health")
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.base_url, headers={"Authorization": f"Key {KEY}"},
                           checks=CHECKS, timeout=30)


def test_put_on_a_multipart_complete_route_is_405(fuzz_server):
    import httpx

    for path in ("/storage/upload/multipart/abc/complete", "/files/f/a.png/multipart/abc/complete"):
        r = httpx.put(fuzz_server.base_url + path, headers={"Authorization": f"Key {KEY}"})
        assert r.status_code == 405 and r.headers["allow"] == "POST", (path, r.status_code, r.text)


def test_openapi_documents_the_api_key_and_the_storage_types(fuzz_server):
    import httpx

    doc = httpx.get(fuzz_server.base_url + "/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["ApiKey"]
    assert scheme["type"] == "apiKey" and scheme["in"] == "header" and scheme["name"] == "Authorization"
    submit = doc["paths"]["/queue/fal-ai/flux-2/klein/9b/base"]["post"]
    assert submit["security"] == [{"ApiKey": []}]
    assert {"200", "401", "413", "422", "429", "503"} <= set(submit["responses"])
    params = doc["paths"]["/storage/upload/initiate"]["post"]["parameters"]
    storage_type = next(p for p in params if p["name"] == "storage_type")
    assert "fal-cdn-v3" in str(storage_type["schema"]) and "gcs" in str(storage_type["schema"])
