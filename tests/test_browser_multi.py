"""The playground of a server that serves two klein families (`--model 9b-base=tiny,9b=tiny-distilled`),
in a real browser (Debian's headless Chromium, Playwright): the picker groups the endpoints by family
with whether each model is loaded, a line says what is served, and a request on the distilled
endpoint (its form has no guidance scale) gives an image. Skipped when /usr/bin/chromium is absent."""

from __future__ import annotations

import time

import httpx
import pytest

from browser_helpers import chromium, require_chromium
from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

pytestmark = pytest.mark.browser

KEY = "browser-multi-key"

sync_api = require_chromium()


def test_the_picker_lists_the_served_families_and_runs_the_distilled_one(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", api_keys=[KEY], model="9b-base=tiny,9b=tiny-distilled",
                        device="cpu", dtype="float32", no_warmup=True)
    with serve_app(create_app(settings, load_engine=True)) as server:
        deadline = time.monotonic() + 120
        while httpx.get(server.base_url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        expect = sync_api.expect
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            try:
                page.goto(server.base_url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                page.fill("#api-key", KEY)
                picker = page.locator("#endpoint-picker")
                expect(picker).to_be_visible()
                groups = picker.locator("optgroup")
                assert groups.count() == 2
                assert groups.nth(0).get_attribute("label") == "FLUX.2 [klein] 9B base · loaded"
                assert groups.nth(1).get_attribute("label") == "FLUX.2 [klein] 9B · loaded"
                assert groups.nth(1).locator("option").count() == 4
                served = page.locator("#served-families")
                expect(served).to_be_visible()
                expect(served).to_contain_text("FLUX.2 [klein] 9B (loaded)")
                assert "--model 4b=" in (picker.get_attribute("title") or "")
                picker.select_option("fal-ai/flux-2/klein/9b")
                expect(page.locator("#endpoint-id")).to_have_text("fal-ai/flux-2/klein/9b")
                expect(page.locator(".field-guidance_scale")).to_have_count(0)
                page.fill("#f-prompt", "a lighthouse")
                page.fill("#f-seed", "3")
                page.click("#generate")
                expect(page.locator("#gallery img")).to_have_count(1, timeout=120_000)
                expect(page.locator("#snippet")).to_contain_text("fal-ai/flux-2/klein/9b")
                assert not errors, errors
            finally:
                browser.close()
