"""Input files of requests (service/inputs.py, service/loras.py): data: URIs, our own stored files, URLs
fetched from a real HTTP server on 127.0.0.1, local paths; every bad input an InputError that names the
item and the reason; the LoRA download cache."""

from __future__ import annotations

import base64
import io
import os
import time

import pytest
from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from PIL import Image

from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.schema import FluxKleinEditInput, LoraWeight
from kleinserve.service.inputs import (
    InputError,
    InputSources,
    RequestInputs,
    open_image,
    resolve_images,
)
from kleinserve.service.loras import LoraCache
from kleinserve.service.netguard import NetPolicy
from kleinserve.service.settings import Settings
from kleinserve.service.storage import LocalFileStorage
from service_helpers import serve_app


def png(width=80, height=64, mode="RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else None).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny.safetensors", layout="kohya")


@pytest.fixture(scope="module")
def http(lora_file):
    """A real HTTP server with the cases a fetch meets."""
    app = FastAPI()
    hits = {"lora": 0}

    @app.get("/ok.png")
    def ok():
        return Response(png(), media_type="image/png")

    @app.get("/text")
    def text():
        return Response(b"hello, not an image", media_type="text/plain")

    @app.get("/big")
    def big():
        return Response(b"\0" * (3 * 1024 * 1024), media_type="application/octet-stream")

    @app.get("/big-chunked")
    def big_chunked():
        return StreamingResponse((b"\0" * 65536 for _ in range(64)), media_type="application/octet-stream")

    @app.get("/slow")
    def slow():
        def gen():
            for _ in range(50):
                time.sleep(0.1)
                yield b"\0" * 10
        return StreamingResponse(gen())

    @app.get("/redirect")
    def redirect():
        return RedirectResponse("/ok.png", status_code=302)

    @app.get("/loop")
    def loop():
        return RedirectResponse("/loop", status_code=302)

    @app.get("/lora.safetensors")
    def lora():
        hits["lora"] += 1
        return Response(lora_file.read_bytes(), media_type="application/octet-stream")

    with serve_app(app) as server:
        server.hits = hits
        yield server


LOOPBACK_OK = NetPolicy(allow_private=True)  # the test server is on 127.0.0.1


def sources(**kw) -> InputSources:
    base = dict(max_bytes=2 * 1024 * 1024, timeout=2.0, policy=LOOPBACK_OK)
    base.update(kw)
    return InputSources(**base)


def error_of(urls, src=None) -> InputError:
    with pytest.raises(InputError) as info:
        resolve_images(urls, src or sources())
    return info.value


def test_data_uri_and_fetched_url(http):
    images = resolve_images([data_uri(png(90, 70)), f"{http.base_url}/ok.png", f"{http.base_url}/redirect"],
                            sources())
    assert [im.size for im in images] == [(90, 70), (80, 64), (80, 64)]
    assert all(im.mode == "RGB" for im in images)


def test_bad_items_are_named(http):
    ok = data_uri(png())
    cases = [
        ([ok, f"{http.base_url}/missing.png"], "image_urls[1]: could not fetch (HTTP 404)"),
        ([f"{http.base_url}/text"], "image_urls[0]: not an image"),
        ([ok, ok, f"{http.base_url}/big"], "image_urls[2]: larger than 2MiB"),
        ([f"{http.base_url}/big-chunked"], "image_urls[0]: larger than 2MiB"),
        ([f"{http.base_url}/slow"], "image_urls[0]: could not fetch (took longer than 2s)"),
        ([f"{http.base_url}/loop"], "image_urls[0]: could not fetch (more than 5 redirects)"),
        (["data:image/png;base64,@@@"], "image_urls[0]: not a valid data: URI (bad base64)"),
        ([data_uri(png(40, 80))], "image_urls[0]: too small: 40x80"),
        ([data_uri(png(640, 64))], "image_urls[0]: aspect ratio too extreme"),
        (["ftp://example.com/a.png"], "image_urls[0]: not an https URL or a data: URI"),
        (["/etc/passwd"], "image_urls[0]: not an https URL or a data: URI"),
    ]
    for urls, expected in cases:
        err = error_of(urls)
        assert str(err).startswith(expected), (str(err), expected)
        assert err.detail()[0]["loc"] == ["body", "image_urls", int(expected.split("[")[1][0])]


def test_pixel_limit_and_decompression_bombs():
    big = png(3000, 3000)
    with pytest.raises(Exception, match="larger than 1000000 pixels"):
        open_image(big, max_pixels=1_000_000)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000  # Pillow's own limit applies too
    try:
        with pytest.raises(Exception, match="decompression-bomb"):
            open_image(big, max_pixels=10**9)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_modes_are_converted_like_diffusers():
    im = open_image(png(mode="RGBA"), max_pixels=10**7)
    assert im.mode == "RGB"
    im = open_image(png(mode="L"), max_pixels=10**7)
    assert im.mode == "RGB"


def test_our_own_uploads_are_read_from_storage_not_fetched(tmp_path):
    storage = LocalFileStorage(tmp_path / "files")
    stored = storage.put(png(96, 64), "image/png", "mine.png")
    base = "https://kleinserve.invalid:8443"  # unreachable: a fetch would fail
    src = sources(storage=storage, own_bases=(base,))
    [im] = resolve_images([stored.url(base)], src)
    assert im.size == (96, 64)
    err = error_of([base + "/files/" + "0" * 32 + "/gone.png"], src)
    assert "image_urls[0]: no such uploaded file" in str(err)


def test_local_paths_only_where_allowed(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(png())
    assert resolve_images([str(path)], sources(allow_local_paths=True))[0].size == (80, 64)
    assert "not an https URL" in str(error_of([str(path)]))


def test_schema_checks_image_urls():
    with pytest.raises(ValueError, match="at least 1"):
        FluxKleinEditInput(prompt="x", image_urls=[])
    with pytest.raises(ValueError, match="at most 4"):
        FluxKleinEditInput(prompt="x", image_urls=["data:,x"] * 5)
    with pytest.raises(ValueError, match=r"image_urls\[1\]: not an https URL"):
        FluxKleinEditInput(prompt="x", image_urls=["https://a/b.png", "file:///etc/passwd"])


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_download_is_cached(http, tmp_path, lora_file):
    cache = LoraCache(tmp_path / "cache", max_bytes=10 * 1024**2)
    url = f"{http.base_url}/lora.safetensors"
    before = http.hits["lora"]
    [first] = cache.resolve([LoraWeight(path=url, scale=0.7)], sources())
    [again] = cache.resolve([LoraWeight(path=url)], sources())
    assert first.file == again.file and first.file.read_bytes() == lora_file.read_bytes()
    assert (first.scale, again.scale, first.name) == (0.7, 1.0, url)
    assert http.hits["lora"] == before + 1


def test_lora_cache_evicts_least_recently_used(http, tmp_path, lora_file):
    size = lora_file.stat().st_size
    cache = LoraCache(tmp_path / "cache", max_bytes=int(size * 2.5))
    files = []
    for k in range(3):
        [f] = cache.resolve([LoraWeight(path=f"{http.base_url}/lora.safetensors?v={k}")], sources())
        files.append(f.file)
        os.utime(f.file, (time.time() + k, time.time() + k))
    assert not files[0].exists() and files[1].exists() and files[2].exists()


def test_bad_lora_paths_are_named(http, tmp_path):
    cache = LoraCache(tmp_path / "cache", max_bytes=10**8, lora_dir=tmp_path / "loras")
    (tmp_path / "loras").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    cases = [
        (f"{http.base_url}/ok.png", "loras[0]: path: not a safetensors file"),
        (f"{http.base_url}/nope.safetensors", "loras[0]: path: could not fetch (HTTP 404)"),
        ("../secret.safetensors", "loras[0]: path: local paths must lie under the LoRA folder"),
        ("missing.safetensors", "loras[0]: path: no such file"),
    ]
    for path, expected in cases:
        with pytest.raises(InputError) as info:
            cache.resolve([LoraWeight(path=path)], sources())
        assert str(info.value).startswith(expected), (str(info.value), expected)


def test_lora_under_the_lora_folder(tmp_path, lora_file):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(lora_file.read_bytes())
    cache = LoraCache(tmp_path / "cache", max_bytes=10**8, lora_dir=folder)
    [f] = cache.resolve([LoraWeight(path="style.safetensors", scale=0.5)], sources())
    assert f.file == (folder / "style.safetensors").resolve()


def test_request_inputs_resolves_both(tmp_path, http):
    settings = Settings(data_dir=tmp_path / "data", webhook_allow_private=True)  # the LoRA is on 127.0.0.1
    storage = LocalFileStorage(tmp_path / "files")
    stored = storage.put(png(), "image/png", "a.png")
    inputs = RequestInputs(settings, storage)
    from kleinserve.schema import FluxKleinEditLoraInput

    request = FluxKleinEditLoraInput(prompt="x", image_urls=[stored.url("https://me.invalid"), data_uri(png())],
                                     loras=[{"path": f"{http.base_url}/lora.safetensors", "scale": 0.5}])
    lines = []
    files = inputs.resolve(request, public_base="https://me.invalid", log=lines.append)
    assert len(files.images) == 2 and len(files.loras) == 1
    assert files.loras[0].file.parent == tmp_path / "data" / "lora-cache"
    assert lines == ["input images: 80x64, 80x64", f"LoRA files: {http.base_url}/lora.safetensors (scale 0.5)"]


def test_the_default_policy_refuses_private_and_loopback_image_urls(http):
    """The SSRF guard is in the one fetch: loopback (and, by the guard's own tests, every private or
    link-local notation) is refused unless the server allows it."""
    url = f"{http.base_url}/ok.png"
    for blocked in (url, url.replace("127.0.0.1", "localhost"), "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(InputError, match="image_urls\\[0\\]: could not fetch"):
            resolve_images([blocked], InputSources(max_bytes=2 * 1024 * 1024, timeout=2.0))
