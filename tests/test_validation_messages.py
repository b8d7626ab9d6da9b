"""One clear validation message per problem, over HTTP (the real app) and from the schema helper."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.schema import JSON_BODY_HINT, FluxKleinInput, tidy_validation_errors
from kleinserve.service.settings import Settings

KEY = "validation-key"
SUBMIT = "/queue/fal-ai/flux-2/klein/9b/base"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("val") / "data", api_keys=[KEY]), start_worker=False)
    with TestClient(app) as c:
        yield c


def _detail(client, **kw):
    headers = {"Authorization": f"Key {KEY}", **kw.pop("headers", {})}
    r = client.post(SUBMIT, headers=headers, **kw)
    assert r.status_code == 422, r.text
    return [(d["loc"], d["msg"]) for d in r.json()["detail"]]


def test_custom_size_out_of_range_is_one_message_per_side(client):
    assert _detail(client, json={"prompt": "x", "image_size": {"width": 5000, "height": 512}}) == [
        (["body", "image_size", "width"], "must be 64..2048 (got 5000)")]
    assert _detail(client, json={"prompt": "x", "image_size": {"width": 5000, "height": 10}}) == [
        (["body", "image_size", "width"], "must be 64..2048 (got 5000)"),
        (["body", "image_size", "height"], "must be 64..2048 (got 10)")]


def test_unknown_preset_is_one_message(client):
    [(loc, msg)] = _detail(client, json={"prompt": "x", "image_size": "huge"})
    assert loc == ["body", "image_size"]
    assert "'landscape_4_3'" in msg and '"width"' in msg and "(got 'huge')" in msg


@pytest.mark.parametrize("kw", [
    {"data": {"prompt": "x"}},                                                  # an HTML form
    {"content": b"prompt=x", "headers": {"content-type": "text/plain"}},        # text
    {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},    # not an object
    {"content": b"{bad", "headers": {"content-type": "application/json"}},      # not JSON
    {"content": b"", "headers": {"content-type": "application/json"}},          # nothing
])
def test_a_body_that_is_not_a_json_object(client, kw):
    [(loc, msg)] = _detail(client, **kw)
    assert loc == ["body"] and msg.endswith(JSON_BODY_HINT) and "application/json" in msg


def test_ranges_and_plain_errors(client):
    got = dict((tuple(loc), msg) for loc, msg in _detail(client, json={"prompt": "x", "num_inference_steps": 100,
                                                                      "guidance_scale": "lots"}))
    assert got[("body", "num_inference_steps")] == "must be 4..50 (got 100)"
    assert got[("body", "guidance_scale")].endswith("(got 'lots')")


def test_helper_without_the_body_prefix():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        FluxKleinInput.model_validate({"prompt": "x", "image_size": {"width": 64, "height": 9999}})
    assert tidy_validation_errors(exc.value.errors()) == [
        {"loc": ["image_size", "height"], "msg": "must be 64..2048 (got 9999)", "type": "less_than_equal"}]
