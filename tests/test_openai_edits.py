"""The official `openai` package's `images.edit` against a live server (the tiny model): reference
images as multipart files run the edit endpoint; errors in OpenAI's shape. (Uses the main line's app
services: runs after this branch is merged there; checked in a trial merge.)"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

KEY = "openai-edit-key"
FAST = {"num_inference_steps": 4, "seed": 5, "enable_safety_checker": False}


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("openai-edits") / "data", api_keys=[KEY])
    with serve_app(create_app(settings, engine=tiny_engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=180)


def png(seed: int, width: int, height: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")).astype(np.int16)


def test_edit_takes_the_first_image_size_and_matches_the_engine(client, tiny_engine):
    first, second = png(1, 101, 75), png(2, 80, 96)
    res = client.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                             prompt="make it night", extra_body=FAST)
    assert res.size == "96x64" and len(res.data) == 1
    from kleinserve.schema import FluxKleinEditInput

    request = FluxKleinEditInput(prompt="make it night", image_urls=["data:,a", "data:,b"], **FAST)
    direct = tiny_engine.generate(request, reference_images=[Image.open(io.BytesIO(b)).convert("RGB")
                                                              for b in (first, second)])
    ours = decoded(res.data[0])
    assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(direct.images[0].data)).convert("RGB")))


def test_one_image_size_and_n(client):
    res = client.images.edit(image=("a.png", png(3, 64, 64), "image/png"), prompt="a fox", size="64x80", n=2,
                             extra_body=FAST)
    assert res.size == "64x80" and len(res.data) == 2


@pytest.mark.parametrize("kwargs,needle", [
    (dict(image=("a.txt", b"hello", "text/plain")), "image_urls[0]: not an image"),
    (dict(image=[("a.png", png(4, 64, 64), "image/png")] * 5), "At most 4 images"),
    (dict(image=("a.png", png(4, 64, 64), "image/png"), mask=("m.png", png(5, 64, 64), "image/png")),
     "'mask' is not supported"),
    (dict(image=("a.png", png(4, 64, 64), "image/png"), size="12x12"), "Invalid size '12x12'"),
])
def test_errors_are_400_in_openai_shape(client, kwargs, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(prompt="x", extra_body=FAST, **kwargs)
    assert needle in info.value.body["message"]
