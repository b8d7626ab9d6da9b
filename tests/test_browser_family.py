"""The playground's endpoint picker in a real browser (Debian's headless Chromium, Playwright): pick
the edit + LoRA endpoint, upload an input image (a thumbnail appears), add a LoRA uploaded to our
storage, generate, get the image at the input's size; back on the base endpoint the edit fields are
gone and the prompt is kept. Skipped when /usr/bin/chromium is absent. (Uses the main line's app
services: runs after this branch is merged there; checked in a trial merge.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from browser_helpers import chromium, require_chromium
from kleinserve.api.app import create_app
from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.service.settings import Settings
from service_helpers import serve_app

pytestmark = pytest.mark.browser

KEY = "browser-family-key"
WAIT_MS = 120_000
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

sync_api = require_chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kleinserve.engine import load_engine

    engine = load_engine("tiny", device="cpu", dtype="float32")  # its own: LoRA adapters stay in it
    settings = Settings(data_dir=tmp_path_factory.mktemp("browser-family") / "data", api_keys=[KEY])
    with serve_app(create_app(settings, engine=engine)) as srv:
        yield srv


def test_pick_the_edit_lora_endpoint_and_generate(server, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    lora = save_tiny_lora(tmp_path / "style.safetensors", layout="diffusers")
    up = httpx.post(f"{server.base_url}/files/upload", content=lora.read_bytes(),
                    headers={"Authorization": f"Key {KEY}", "content-type": "application/octet-stream",
                             "x-fal-file-name": "style.safetensors"})
    assert up.status_code == 200, up.text
    lora_url = up.json()["access_url"]

    expect = sync_api.expect
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and "Failed to load resource" not in m.text else None)
        try:
            page.goto(server.base_url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            page.fill("#api-key", KEY)
            picker = page.locator("#endpoint-picker")
            expect(picker).to_be_visible()
            assert picker.locator("option").count() == 4
            expect(page.locator(".field-image_urls")).to_have_count(0)
            page.fill("#f-prompt", "the same scene at night")

            picker.select_option("fal-ai/flux-2/klein/9b/base/edit/lora")
            expect(page.locator("#endpoint-id")).to_have_text("fal-ai/flux-2/klein/9b/base/edit/lora")
            expect(page.locator(".field-image_urls")).to_have_count(1)
            expect(page.locator(".field-loras")).to_have_count(1)
            expect(page.locator("#f-prompt")).to_have_value("the same scene at night")  # kept
            page.set_input_files("#f-image_urls-file", str(image))
            expect(page.locator("#f-image_urls .thumb img")).to_have_count(1, timeout=20_000)
            assert page.locator("#f-image_urls .thumb img").get_attribute("src").startswith(server.base_url + "/files/")
            page.click("#f-loras-add")
            page.fill(".lora-row .lora-path", lora_url)
            page.fill(".lora-row .lora-scale", "0.8")
            page.fill("#f-num_inference_steps", "4")
            page.fill("#f-seed", "9")
            page.click("#generate")
            img = page.locator("#gallery img")
            expect(img).to_have_count(1, timeout=WAIT_MS)
            page.wait_for_function("() => document.querySelector('#gallery img').complete && "
                                   "document.querySelector('#gallery img').naturalWidth === 96", timeout=30_000)
            expect(page.locator("#result-meta")).to_contain_text("size 96×64")
            expect(page.locator("#snippet")).to_contain_text("fal-ai/flux-2/klein/9b/base/edit/lora")
            expect(page.locator("#snippet")).to_contain_text("style.safetensors")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground-edit-lora.png"), full_page=True)

            picker.select_option("fal-ai/flux-2/klein/9b/base")
            expect(page.locator(".field-image_urls")).to_have_count(0)
            expect(page.locator(".field-negative_prompt")).to_have_count(1)
        finally:
            page.close()
            browser.close()
    assert not errors, f"JavaScript errors: {errors}"
