"""The web playground in a real browser: Debian's headless Chromium driven by Playwright.

Against a live kleinserve server (uvicorn on 127.0.0.1, plain http, the tiny model): load the page, check the
form was generated from the schema (every cns_* field with its default), see a missing-key error and
validation errors next to their fields, generate with the tiny model (queue position / progress bar,
live preview, the final image with seed/size/timings, snippets), cancel a running request, read the
history. Saves screenshots to artifacts/ (and, with KLEINSERVE_UPDATE_SCREENSHOT=1, the README's
docs/img/playground.png).

Skipped only when /usr/bin/chromium is absent (.ci/run installs it). Never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from browser_helpers import require_chromium
from kleinserve.api.app import create_app
from kleinserve.schema import FluxKleinInput
from kleinserve.service.settings import Settings
from service_helpers import serve_app

pytestmark = pytest.mark.browser

KEY = "browser-test-key"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
README_SHOT = ROOT / "docs" / "img" / "playground.png"
WAIT_MS = 120_000  # generous: CI machines can be slow; the tiny model itself takes seconds

sync_api = require_chromium()


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("browser") / "data", api_keys=[KEY], preview_every=1)
    with serve_app(create_app(settings, engine=tiny_engine)) as srv:
        yield srv


def test_playground_end_to_end(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1250})
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text else None)
    page.on("request", lambda r: foreign.append(r.url)
            if not (r.url.startswith(server.base_url) or r.url.startswith("data:")) else None)
    expect = sync_api.expect

    try:
        # ---------------------------------------------------------------- the page and its form
        page.goto(server.base_url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        expect(page.locator("#endpoint-id")).to_have_text("fal-ai/flux-2/klein/9b/base")
        expect(page.locator("#model-badge")).to_contain_text("tiny")
        # Generated from the schema: every field has a control (sync_mode is deliberately hidden),
        # every cns_* field is in the Advanced section with its default and description.
        for name, field in FluxKleinInput.model_fields.items():
            if name == "sync_mode":
                continue
            box = page.locator(f".field-{name}")
            expect(box).to_have_count(1)
            if name.startswith("cns_") or name == "enable_cns":
                assert page.locator(f"#fields-cns .field-{name}").count() == 1, name
                expect(box.locator(".help")).to_have_text(field.description)
                default = field.default
                shown = str(default).lower() if isinstance(default, bool) else str(default)
                expect(box.locator(".default")).to_contain_text(shown)
        expect(page.locator("#advanced summary")).to_contain_text("Advanced: Colored Noise Sampling")

        # ---------------------------------------------------------------- errors
        page.click("#generate")  # no key yet
        expect(page.locator("#top-error")).to_be_visible()
        expect(page.locator("#top-error")).to_contain_text("API key")

        page.fill("#api-key", "wrong-key")
        page.fill("#f-prompt", "a fox")
        page.click("#generate")
        expect(page.locator("#top-error")).to_contain_text("rejected this API key", timeout=20_000)

        page.fill("#api-key", KEY)
        page.fill("#f-prompt", "")  # min_length=1
        page.check("#size-custom", force=True)
        page.fill("#f-image_size-width", "5000")  # > 2048
        page.click("#generate")
        expect(page.locator(".field-prompt .field-error")).to_be_visible(timeout=20_000)
        expect(page.locator(".field-image_size .field-error")).to_contain_text("width")
        expect(page.locator("#top-error")).to_contain_text("Invalid input")
        page.screenshot(path=str(ARTIFACTS / "playground-validation.png"))

        # ---------------------------------------------------------------- cancel a running request
        page.fill("#f-prompt", "a request that will be cancelled")
        page.check("input[name=image_size_choice][value=square_hd]", force=True)
        page.fill("#f-num_inference_steps", "50")
        page.click("#generate")
        expect(page.locator(".field-error")).to_have_count(0)
        expect(page.locator("#cancel")).to_be_visible()
        expect(page.locator("#progress")).to_be_visible()
        expect(page.locator("#status-pill")).to_have_text("running", timeout=WAIT_MS)
        page.click("#cancel")
        expect(page.locator("#status-pill")).to_have_text("cancelled", timeout=WAIT_MS)
        expect(page.locator("#cancel")).to_be_hidden()
        expect(page.locator("#history tr:has-text('a request that will be cancelled') .pill")).to_have_text(
            "cancelled", timeout=20_000)

        # ---------------------------------------------------------------- generate
        prompt = "a red fox in fresh snow at golden hour, telephoto"
        page.fill("#f-prompt", prompt)
        page.fill("#f-negative_prompt", "blurry, watermark")
        page.check("#size-custom", force=True)
        page.fill("#f-image_size-width", "320")
        page.fill("#f-image_size-height", "240")
        # enough steps that the page's progress stream follows the request before its previews are due
        # (previews are made only while someone watches; the 1+1-block tiny model runs 8 steps in ~0.3 s)
        page.fill("#f-num_inference_steps", "32")
        page.fill("#f-seed", "1234")
        page.click("#generate")
        # progress per step and a live preview from the stream
        expect(page.locator("#progress-label")).to_contain_text("step", timeout=WAIT_MS)
        # (functions, not expression strings: the page's CSP forbids eval, which string predicates use)
        page.wait_for_function("() => document.querySelector('#preview').src.startsWith('data:image/')",
                               timeout=WAIT_MS)
        page.screenshot(path=str(ARTIFACTS / "playground-progress.png"))
        # the final image
        img = page.locator("#gallery img")
        expect(img).to_have_count(1, timeout=WAIT_MS)
        page.wait_for_function("() => document.querySelector('#gallery img').complete && "
                               "document.querySelector('#gallery img').naturalWidth === 320", timeout=30_000)
        expect(page.locator("#status-pill")).to_have_text("completed")
        meta = page.locator("#result-meta")
        expect(meta).to_contain_text("seed 1234")
        expect(meta).to_contain_text("size 320×240")
        expect(meta).to_contain_text("denoise")
        download = page.locator("#gallery a.dl")
        assert download.get_attribute("href").startswith(server.base_url + "/files/")
        assert download.get_attribute("download").endswith(".png")
        # snippets for exactly this input; the key never appears in them
        snippet = page.locator("#snippet")
        expect(snippet).to_contain_text(prompt)
        expect(snippet).to_contain_text('"seed": 1234')
        page.click(".tab[data-lang=python]")
        expect(snippet).to_contain_text("import")
        expect(snippet).to_contain_text('"num_inference_steps": 32')
        page.click(".tab[data-lang=javascript]")
        expect(snippet).to_contain_text("@fal-ai/client")
        page.click(".tab[data-lang=curl]")
        assert KEY not in snippet.inner_text()
        # reuse last seed
        page.click("#seed-random")
        expect(page.locator("#f-seed")).to_have_value("")
        page.click("#seed-reuse")
        expect(page.locator("#f-seed")).to_have_value("1234")
        # history from the server: both requests with their status
        expect(page.locator(f"#history tr:has-text('{prompt}') .pill")).to_have_text("completed", timeout=20_000)
        expect(page.locator("#history tbody tr")).to_have_count(2)

        # the key lives in sessionStorage only, never in the page's markup
        assert page.evaluate("sessionStorage.getItem('kleinserve.apiKey')") == KEY
        assert KEY not in page.content()

        # Screenshots: a viewport tall enough for the whole form (the form panel scrolls on its own).
        page.locator("#gen-form").evaluate("f => f.scrollTop = 0")
        page.evaluate("window.scrollTo(0, 0)")
        form_h = page.evaluate("document.querySelector('#gen-form').scrollHeight")
        page.set_viewport_size({"width": 1400, "height": max(1250, form_h + 170)})
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        if os.environ.get("KLEINSERVE_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture on demand only
            README_SHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ARTIFACTS / "playground.png", README_SHOT)
        page.click("#advanced summary")
        expect(page.locator("#fields-cns .field-cns_s_churn")).to_be_visible()
        form_h = page.evaluate("document.querySelector('#gen-form').scrollHeight")
        page.set_viewport_size({"width": 1400, "height": form_h + 170})
        page.locator(".form-panel").screenshot(path=str(ARTIFACTS / "playground-advanced.png"))
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "playground-failure.png"), full_page=True)
        raise
    finally:
        page.close()

    assert not foreign, f"the page loaded something from elsewhere (must work offline): {foreign}"
    assert not errors, f"JavaScript errors: {errors}"
