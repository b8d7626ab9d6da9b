"""The playground as a new user meets it, in Debian's headless Chromium (Playwright): at 1440x900 and at
a phone width the layout fits (no inner form scroller, nothing under the sticky Generate bar, no
sideways scrolling); the API tab has snippets before the first run and follows the form; its queue
curl snippet runs as is; the Logs tab shows the request's log lines; history thumbnails of data-URI
(sync_mode) results are real images."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from browser_helpers import require_chromium
from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

pytestmark = pytest.mark.browser

KEY = "layout-test-key"
WAIT_MS = 120_000
ENDPOINT = "fal-ai/flux-2/klein/9b/base"

sync_api = require_chromium()
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("layout") / "data", api_keys=[KEY], preview_every=2)
    with serve_app(create_app(settings, engine=tiny_engine)) as srv:
        yield srv


def _open(browser, server, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base_url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.fill("#api-key", KEY)
    return page, errors


def _no_sideways_scroll(page):
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1"), \
        page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")


def _visible_and_uncovered(page, selector):
    """The element is inside the viewport and the topmost element at its centre (not under a bar)."""
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel);
        const r = el.getBoundingClientRect();
        const x = r.left + r.width / 2, y = r.top + r.height / 2;
        if (y < 0 || y > window.innerHeight || x < 0 || x > window.innerWidth) return false;
        const top = document.elementFromPoint(x, y);
        return top === el || el.contains(top);
    }""", selector)


@pytest.mark.parametrize("width, height", [(1440, 900), (390, 844)])
def test_layout_fits(browser, server, width, height):
    page, errors = _open(browser, server, width, height)
    try:
        _no_sideways_scroll(page)
        # The form is part of the page: it does not scroll on its own.
        assert page.evaluate("() => { const p = document.querySelector('.form-panel');"
                             " return p.scrollHeight <= p.clientHeight + 1; }")
        # Every field, scrolled to the bottom edge (where the sticky Generate bar sits), stays uncovered.
        for sel in ("#f-seed", "#f-num_inference_steps", "#f-prompt"):
            page.evaluate("(s) => document.querySelector(s).scrollIntoView({block: 'end'})", sel)
            assert _visible_and_uncovered(page, sel), (sel, width)
            page.focus(sel)
            assert _visible_and_uncovered(page, sel), (sel, width)
        # The Generate button is always reachable.
        page.evaluate("() => document.querySelector('#f-seed').scrollIntoView({block: 'center'})")
        assert _visible_and_uncovered(page, "#generate")
        if width < 900:  # one column: the result comes after the form
            form = page.locator(".form-panel").bounding_box()
            right = page.locator(".right-col").bounding_box()
            assert right["y"] >= form["y"] + form["height"] - 1 and right["width"] <= width
        else:  # form left, result right
            form = page.locator(".form-panel").bounding_box()
            right = page.locator(".right-col").bounding_box()
            assert right["x"] > form["x"] + form["width"] - 1 and abs(right["y"] - form["y"]) < 5
        page.screenshot(path=str(_artifacts() / f"playground-{width}x{height}.png"), full_page=True)
        assert errors == []
    finally:
        page.close()


def test_api_tab_logs_and_a_runnable_queue_snippet(browser, server, tmp_path):
    page, errors = _open(browser, server, 1440, 900)
    try:
        snippet = page.locator("#snippet")
        # Before any run: snippets for the form as it is, without a key and without input.json.
        expect(snippet).to_contain_text(f"/queue/{ENDPOINT}")
        assert "input.json" not in snippet.inner_text() and KEY not in snippet.inner_text()
        page.fill("#f-prompt", "a snippet that follows the form")
        page.check("#size-custom", force=True)
        page.fill("#f-image_size-width", "64")
        page.fill("#f-image_size-height", "64")
        page.fill("#f-num_inference_steps", "4")
        expect(snippet).to_contain_text("a snippet that follows the form")
        expect(snippet).to_contain_text('"num_inference_steps": 4')
        page.click(".tab[data-lang=python]")
        expect(snippet).to_contain_text("a snippet that follows the form")
        page.click(".tab[data-lang=curl]")

        # The curl snippet runs as is in bash (sync run, then the queue round trip).
        code = snippet.inner_text()
        env = {**os.environ, "FAL_KEY": KEY}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(outputs) == 2 and all('"images"' in o for o in outputs), done.stdout[-2000:]

        # A run from the page: the Logs tab shows its lines.
        page.click("#generate")
        expect(page.locator("#gallery img")).to_have_count(1, timeout=WAIT_MS)
        page.click("#view-tab-logs")
        expect(page.locator("#logs")).to_be_visible()
        expect(page.locator("#logs")).to_contain_text("64x64", timeout=20_000)
        expect(page.locator("#logs-count")).to_contain_text("(")
        expect(page.locator(".tab[data-lang=curl]")).to_be_hidden()
        page.click("#view-tab-api")
        expect(page.locator(".tab[data-lang=curl]")).to_be_visible()
        assert errors == []
    finally:
        page.close()


def test_history_thumbnails_of_data_uri_results(browser, server):
    r = httpx.post(f"{server.base_url}/{ENDPOINT}", headers={"Authorization": f"Key {KEY}"}, timeout=300,
                   json={"prompt": "a sync-mode result", "sync_mode": True, "num_inference_steps": 4,
                         "image_size": {"width": 320, "height": 256}})
    assert r.status_code == 200 and r.json()["images"][0]["url"].startswith("data:image/png;base64,")
    page, errors = _open(browser, server, 1440, 900)
    try:
        row = page.locator("#history tr:has-text('a sync-mode result')")
        expect(row).to_have_count(1, timeout=20_000)
        thumb = row.locator("img.thumb")
        expect(thumb).to_have_count(1)
        assert thumb.get_attribute("src").startswith("data:image/jpeg;base64,")
        page.wait_for_function("() => { const i = document.querySelector('#history img.thumb');"
                               " return i && i.complete && i.naturalWidth > 0; }", timeout=20_000)
        w, h = thumb.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert (w, h) == (96, 77)  # 320x256 scaled to fit 96 px
        assert errors == []
    finally:
        page.close()


def _artifacts():
    from pathlib import Path

    d = Path(__file__).resolve().parent.parent / "artifacts"
    d.mkdir(exist_ok=True)
    return d
