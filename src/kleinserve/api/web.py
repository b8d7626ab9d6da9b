"""The web playground and the small JSON routes it needs.

    GET /                  the playground page (static HTML; no build step, no CDN)
    GET /web/{file}        its script and stylesheet
    GET /api/schema        the endpoint's input JSON schema + presets + where the queue lives
                           (the form is generated from it, so it never drifts from the model)
    GET /api/requests      the caller's recent requests (per API key) with their status: the history
    GET /api/requests/{id}/progress
                           SSE: the queue's status objects (same JSON as the queue status stream) plus,
                           while running, {"status": "IN_PROGRESS", "progress": {"step", "total"},
                           "preview": "data:image/jpeg;base64,..."} step events; closes after COMPLETED.
                           The fal status stream stays exactly fal's; this one is for the page.

The page itself holds no secret: the user pastes a key, which the browser keeps in sessionStorage and
sends as `Authorization: Key <key>` on the queue calls, exactly as the fal clients do.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import threading
from collections import OrderedDict
from functools import cache
from importlib import resources
from typing import Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from kleinserve.endpoints import app_prefix
from kleinserve.schema import ENDPOINT_ID, FAMILIES, IMAGE_SIZE_PRESETS, INPUT_MODELS, FluxKleinInput, FluxKleinOutput
from kleinserve.service.auth import Principal
from kleinserve.service.events import watch
from kleinserve.service.jobs import Job

from . import deps
from .deps import request_urls, require_principal
from .queue import SSE_PING_SECONDS, load_job, status_payload

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}
# The page only talks to its own origin; no inline script, no third-party anything.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _read_static(name: str) -> bytes:
    return resources.files("kleinserve").joinpath("web").joinpath(name).read_bytes()


def _static_response(name: str) -> Response:
    try:
        body = _read_static(name)
    except (FileNotFoundError, OSError):
        raise HTTPException(status_code=404, detail=f"{name} is missing from the installed package") from None
    headers = dict(_HEADERS)
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = _CSP
    return Response(content=body, media_type=_STATIC[name], headers=headers)


@router.get("/", response_class=Response)
async def playground() -> Response:
    return _static_response("index.html")


@router.get("/web/{name}", response_class=Response)
async def web_static(name: str) -> Response:
    if name not in _STATIC:
        raise HTTPException(status_code=404, detail="Not Found")
    return _static_response(name)


# --------------------------------------------------------------------------------------- schema

@router.get("/api/schema")
async def api_schema(request: Request, endpoint: Optional[str] = Query(None)) -> JSONResponse:
    """One endpoint's input schema (`?endpoint=<id>`; default: the first declared), and the list of
    the endpoints this server serves (the playground's picker)."""
    registry = request.app.state.registry
    if endpoint:
        try:
            spec = registry.get(endpoint)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"this server does not serve {endpoint!r}; it serves "
                                                        + ", ".join(registry.ids())) from None
    else:
        spec = next(iter(registry), None)  # the first declared: the page's default
    info = request.app.state.model_info
    input_model = getattr(spec, "input_model", FluxKleinInput)
    output_model = getattr(spec, "output_model", FluxKleinOutput)
    endpoint_id = getattr(spec, "endpoint_id", ENDPOINT_ID)
    body = {
        "endpoint_id": endpoint_id,
        "title": getattr(spec, "title", "") or endpoint_id,
        "input_schema": input_model.model_json_schema(),
        "output_schema": output_model.model_json_schema(mode="serialization"),
        "image_size_presets": {k: list(v) for k, v in IMAGE_SIZE_PRESETS.items()},
        "queue_path": "/queue",
        "run_path": "",
        "auth_required": request.app.state.auth.enabled,
        "model": dataclasses.asdict(info) if info is not None else None,
        "endpoints": [{"endpoint_id": s.endpoint_id, "title": s.title or s.endpoint_id, "tags": list(s.tags),
                       "family": s.engine} for s in registry],
    }
    # Which klein families are served here (endpoints, checkpoint, loaded / loading / on demand) and
    # how to enable the others: the picker groups the endpoints by family.
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        body.update(await run_in_threadpool(runtime.served))
    for name, family in body.get("families", {}).items():
        family["title"] = FAMILIES[name].title if name in FAMILIES else name
    return JSONResponse(body, headers={"Cache-Control": "no-cache"})


# -------------------------------------------------------------------------------------- history

THUMB_SIDE = 96
_thumbs: OrderedDict[str, Optional[str]] = OrderedDict()
_thumbs_lock = threading.Lock()


def data_uri_thumbnail(key: str, url: str, side: int = THUMB_SIDE) -> Optional[str]:
    """A `data:image/jpeg` thumbnail (<= side px) of an image data URI, cached per request id (the
    history refreshes every few seconds); None when it cannot be decoded."""
    with _thumbs_lock:
        if key in _thumbs:
            _thumbs.move_to_end(key)
            return _thumbs[key]
    thumb: Optional[str]
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
            small = im.convert("RGB")
            small.thumbnail((side, side))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=80)
        thumb = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a broken result just has no thumbnail
        thumb = None
    with _thumbs_lock:
        _thumbs[key] = thumb
        while len(_thumbs) > 512:
            _thumbs.popitem(last=False)
    return thumb


def _history_row(request: Request, job: Job) -> dict[str, Any]:
    inp = dict(job.input or {})
    row: dict[str, Any] = {
        "request_id": job.request_id,
        "endpoint_id": job.endpoint_id,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "prompt": inp.get("prompt", ""),
        "input": inp,
        "seed": inp.get("seed"),
        "num_images": inp.get("num_images", 1),
        "cancel_requested": bool(job.cancel_requested),
        "error": (job.error or {}).get("error") if job.error else None,
        "error_type": (job.error or {}).get("error_type") if job.error else None,
        "inference_time": job.inference_time,
        "queue_time": job.queue_time,
        "mode": job.mode,
        **request_urls(request, app_prefix(job.endpoint_id), job.request_id),
    }
    try:
        w, h = INPUT_MODELS.get(job.endpoint_id, FluxKleinInput).model_validate(inp).resolved_size()
        row["width"], row["height"] = w, h
    except Exception:
        pass
    if job.status == "IN_QUEUE":
        row["queue_position"] = None  # filled by the caller
    result = job.result or {}
    images = result.get("images") or []
    if images:
        row["seed"] = result.get("seed", row["seed"])
        first = images[0]
        url = first.get("url", "")
        # sync_mode / b64_json results are data URIs (megabytes): the history gets a small copy.
        row["thumbnail_url"] = data_uri_thumbnail(job.request_id, url) if url.startswith("data:") else url
        row["images"] = [{k: im.get(k) for k in ("url", "width", "height", "content_type", "file_size")}
                         for im in images if not str(im.get("url", "")).startswith("data:")]
    return row


@router.get("/api/requests")
async def api_requests(
    request: Request,
    limit: int = Query(20, ge=1, le=200),
    principal: Principal = Depends(require_principal),
) -> JSONResponse:
    store = deps.services(request).store

    def page() -> list[dict[str, Any]]:
        # Two store queries per page, whatever its size: the jobs, then the positions of the queued ones.
        jobs = store.list_requests(principal.owner, limit)
        rows = [_history_row(request, job) for job in jobs]  # may decode data URI thumbnails
        queued = [job.request_id for job in jobs if job.status == "IN_QUEUE"]
        if queued:
            try:
                positions = store.queue_positions(queued)
            except Exception:
                log.warning("could not read the queue positions of the history page", exc_info=True)
                positions = {}
            for row in rows:
                if "queue_position" in row:
                    row["queue_position"] = positions.get(row["request_id"])
        return rows

    rows = await run_in_threadpool(page)
    return JSONResponse({"requests": rows}, headers={"Cache-Control": "no-store"})


@router.get("/api/requests/{request_id}/progress")
async def api_request_progress(
    request: Request,
    request_id: str,
    principal: Principal = Depends(require_principal),
) -> Response:
    owner = principal.owner
    await load_job(request, request_id, owner, None)  # 404 as plain JSON before the stream starts
    sv = deps.services(request)

    async def events():
        step: Optional[dict[str, Any]] = None
        async for ev in watch(sv.store, sv.feed, request_id, owner, with_logs=False, steps=True):
            if ev.kind == "progress" and ev.progress is not None:
                step = {"step": ev.progress.step, "total": ev.progress.total}
                payload: dict[str, Any] = {"status": "IN_PROGRESS", "request_id": request_id, "progress": step}
                if ev.progress.preview:
                    payload["preview"] = ev.progress.preview
                yield {"data": json.dumps(payload)}
            elif ev.kind == "status" and ev.job is not None:
                body = await status_payload(request, ev.job, with_logs=False, position=ev.position)
                if step is not None and ev.job.status == "IN_PROGRESS":
                    body["progress"] = step
                yield {"data": json.dumps(body)}

    return EventSourceResponse(events(), ping=SSE_PING_SECONDS, headers={"Cache-Control": "no-store"})
