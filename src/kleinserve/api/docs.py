"""`/docs` (Swagger UI) and `/redoc` (ReDoc) with their assets served from the installed package, so
the API reference renders with no network (FastAPI's defaults load them from a CDN).

The assets come from the pinned `fastapi-offline` package (MIT; it ships swagger-ui-bundle.js,
swagger-ui.css, redoc.standalone.js and a favicon under `fastapi_offline/static/`); the pages are
FastAPI's own `get_swagger_ui_html` / `get_redoc_html` pointed at `/docs/assets/<file>`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_PATH = "/docs/assets"
ASSETS = {  # served name -> content type (nothing else under the package is reachable)
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
TITLE = "kleinserve API"

router = APIRouter(include_in_schema=False)


def assets_dir() -> Path:
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


def _openapi_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + (request.app.openapi_url or "/openapi.json")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request), title=TITLE + " (Swagger UI)",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png", oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_ui_parameters={"persistAuthorization": False, "tryItOutEnabled": False})


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_openapi_url(request), title=TITLE + " (ReDoc)",
                          redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                          redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False)


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"No such docs asset: {name!r}.")
    return FileResponse(assets_dir() / name, media_type=ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})
