"""/docs (Swagger UI) and /redoc render with no network: their assets come from the package, and the
page lists the API's operations. Debian's headless Chromium via Playwright; every request that does not
go to the test server is aborted (and recorded: there must be none)."""

from __future__ import annotations

import os

import httpx
import pytest

from browser_helpers import ABSENT, CHROMIUM, chromium
from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import serve_app

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs") / "data", api_keys=["docs-key"])
    with serve_app(create_app(settings, start_worker=False)) as srv:
        yield srv


def test_assets_are_served_from_the_package(server):
    html = httpx.get(server.base_url + "/docs").text
    assert "cdn." not in html and "/docs/assets/swagger-ui-bundle.js" in html
    redoc = httpx.get(server.base_url + "/redoc").text
    assert "cdn." not in redoc and "fonts.googleapis" not in redoc and "/docs/assets/redoc.standalone.js" in redoc
    for name, kind in [("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css"),
                       ("redoc.standalone.js", "javascript"), ("favicon.png", "image/png")]:
        r = httpx.get(f"{server.base_url}/docs/assets/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 1000, name
    assert httpx.get(server.base_url + "/docs/assets/..%2F__init__.py").status_code == 404
    assert httpx.get(server.base_url + "/docs/assets/core.py").status_code == 404


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=ABSENT)
def test_docs_render_offline_in_chromium(server):
    pytest.importorskip("playwright.sync_api")
    spec = httpx.get(server.base_url + "/openapi.json").json()
    paths = list(spec["paths"])
    with chromium() as browser:
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked: list[str] = []

            def only_local(route):
                if route.request.url.startswith(server.base_url) or route.request.url.startswith("data:"):
                    return route.continue_()
                blocked.append(route.request.url)
                return route.abort()

            page.route("**/*", only_local)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(server.base_url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            shown = page.locator(".opblock-summary-path").all_inner_texts()
            shown = [s.replace("\u200b", "").strip() for s in shown]
            assert "/queue/fal-ai/flux-2/klein/9b/base" in shown
            assert "/v1/images/generations" in shown
            assert len(shown) >= len([p for p in paths]) // 2, shown  # the operations are listed
            page.screenshot(path=str(_artifacts() / "docs-offline.png"))

            page.goto(server.base_url + "/redoc")
            page.wait_for_selector("[data-section-id^='operation/']", timeout=60_000)
            page.wait_for_function("document.body.innerText.includes('/v1/images/generations')", timeout=60_000)
            page.screenshot(path=str(_artifacts() / "redoc-offline.png"))
            # ReDoc's bundle links its "API docs by Redocly" logo from its CDN: a decorative image that
            # offline is just not shown. Nothing else may leave the machine.
            assert [u for u in blocked if not u.endswith("/redoc/logo-mini.svg")] == [] and errors == [], \
                (blocked, errors)
        finally:
            browser.close()


def _artifacts():
    from pathlib import Path

    d = Path(__file__).resolve().parent.parent / "artifacts"
    d.mkdir(exist_ok=True)
    return d
