"""`create_app(settings, engine=None) -> FastAPI`: the run API and the queue API in one process.

- Queue API under the `/queue` path prefix AND on hosts named `queue.*` (the middleware maps
  `queue.example.com/<owner>/...` onto `/queue/<owner>/...`), so both `FAL_QUEUE_RUN_HOST=queue.host`
  and `FAL_QUEUE_RUN_HOST=host:port/queue` work.
- Run API (`POST /<id>`, `POST /<id>/stream`) at the root; both go through the same job queue.
- Every response carries `x-fal-request-id`; trailing slashes are accepted; request bodies are
  limited (413); validation errors are 422 `{"detail": [{"loc", "msg", "type"}]}`.
- `/health` (liveness: never touches the engine) and `/ready` (model loaded; loud about a tiny
  model); `/docs` and `/openapi.json` from the endpoint schemas.
- Then the storage/files routes, the OpenAI adapter, /metrics and the web playground.

The services come from the composition root (service/runtime.py); route handlers reach them through
`deps.services(request)`. The engine runs in a worker thread or process (service/worker.py); the HTTP
event loop never waits on it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from kleinserve import __version__
from kleinserve.endpoints import EndpointRegistry, default_registry
from kleinserve.engine.types import ModelInfo
from kleinserve.service import metrics
from kleinserve.service.auth import Authenticator
from kleinserve.service.jobs import validation_detail
from kleinserve.service.logging import install_access_log_redaction, request_id_var
from kleinserve.service.runtime import TINY_WARNING, Runtime, Services, build_services
from kleinserve.service.settings import Settings

from . import deps, docs, files, openai, web
from . import metrics as metrics_routes
from .families import build_unserved_router
from .queue import build_queue_router
from .run import build_run_router

if TYPE_CHECKING:
    from kleinserve.engine.engine import Engine

log = logging.getLogger(__name__)

# Paths whose bodies are file uploads (limited by --max-upload-bytes instead of --max-request-bytes).
UPLOAD_PATH_PREFIXES = ("/storage/", "/files/")



# ------------------------------------------------------------------------------------ middleware

class _BodyTooLarge(StarletteHTTPException):
    pass


class FalProtocolMiddleware:
    """Pure ASGI middleware: queue host mapping, trailing slashes, body limits, x-fal-request-id,
    HTTP metrics."""

    def __init__(self, app, *, registry: EndpointRegistry, settings: Settings):
        self.app = app
        self.registry = registry
        self.settings = settings
        self.first_segments = registry.first_segments()

    def _limit(self, path: str) -> int:
        if path.startswith(UPLOAD_PATH_PREFIXES):
            return int(self.settings.max_upload_bytes) + (1 << 20)  # the storage routes say why first
        return int(self.settings.max_request_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        scope = dict(scope)
        state = scope.setdefault("state", {})
        state.setdefault("fal_request_id", str(uuid.uuid4()))

        path: str = scope.get("path", "/")
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        host = ""
        for k, v in scope.get("headers", ()):
            if k == b"host":
                host = v.decode("latin-1").lower()
                break
        if host.startswith("queue.") and not path.startswith("/queue/"):
            first = path.lstrip("/").split("/", 1)[0]
            if first in self.first_segments:
                state["queue_base"] = str(StarletteRequest(scope).base_url).rstrip("/")
                path = "/queue" + path
        if path != scope.get("path"):
            scope["path"] = path
            scope["raw_path"] = path.encode("utf-8")

        limit = self._limit(path)
        declared = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
                break
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-fal-request-id" for k, _ in headers):
                    headers.append((b"x-fal-request-id", _header_safe(state.get("fal_request_id"))))
                message = dict(message)
                message["headers"] = headers
            await send(message)

        if declared is not None and declared > limit:
            await _send_json(send_wrapper, 413, {"detail": _too_large_detail(limit)})
            self._record(scope, status_holder["status"], started)
            return

        received = {"n": 0}

        async def receive_wrapper():
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise _BodyTooLarge(status_code=413, detail=_too_large_detail(limit))
            return message

        # Log records emitted while handling this HTTP request carry its id (service/logging.py).
        log_token = request_id_var.set(state["fal_request_id"])
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            self._record(scope, status_holder["status"], started)
            request_id_var.reset(log_token)

    @staticmethod
    def _record(scope, status: int, started: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics.record_http_request(template, scope.get("method", "GET"), status, time.perf_counter() - started)


def _header_safe(value: Any) -> bytes:
    """A header value that cannot break the response: printable ASCII, else a fresh id."""
    text = str(value or "")
    if not text or not all(" " < c < "\x7f" for c in text):
        text = str(uuid.uuid4())
    return text.encode("ascii")


def log_safe(text: str, limit: int = 300) -> str:
    """Client-supplied text (a path) for a log line: control and non-ASCII characters escaped, so it
    cannot forge a line; bounded."""
    return text[:limit].encode("ascii", "backslashreplace").decode("ascii").replace("\r", "\\r") \
        .replace("\n", "\\n").replace("\t", "\\t")


def _too_large_detail(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes."


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------ the app

def create_app(
    settings: Optional[Settings] = None,
    engine: Optional[Engine] = None,
    *,
    services: Optional[Services] = None,
    registry: Optional[EndpointRegistry] = None,
    load_engine: bool = False,
    start_worker: bool = True,
) -> FastAPI:
    """Builds the app. Background parts (event feed, worker(s), maintenance, webhooks) start with the
    app's lifespan (uvicorn, or `with TestClient(app)`) and the services are closed when it ends.

    engine: a loaded Engine; None with `load_engine=True` loads `settings.model` in the background
      (/ready says 503 until it is up); None otherwise leaves jobs queued until `runtime.set_engine`.
    services: built by service.runtime.build_services (default: from `settings`, owned by the app).
    Role (settings.role): "all" runs the worker(s) here, "api" runs none (workers are elsewhere).
    """
    if services is not None:
        settings = services.settings
        registry = services.registry
    settings = settings or Settings.from_sources()
    registry = registry or default_registry(settings.model_specs)
    auth = Authenticator.from_settings(settings)  # refuses to build without keys or --no-auth
    own_services = services is None
    services = services or build_services(settings, registry)

    def on_model(info: ModelInfo) -> None:
        app.state.model_info = info

    runtime = Runtime(services, role=settings.role, engine=engine, load_engine=load_engine,
                      start_worker=start_worker, on_model=on_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(runtime.start)
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)
            if own_services:
                await run_in_threadpool(services.close)

    app = FastAPI(
        title="kleinserve",
        version=__version__,
        description=("Self-hosted, fal-compatible inference service. Authenticate with "
                     "`Authorization: Key <your key>`. Queue API under `/queue` (or a `queue.*` host); "
                     "sync run and streaming at the root."),
        docs_url=None,  # api/docs.py serves /docs and /redoc with packaged assets (no CDN)
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth = auth
    app.state.registry = registry
    app.state.services = services
    app.state.runtime = runtime
    app.state.model_info = None

    _install_error_handlers(app)
    install_access_log_redaction()  # upload URLs carry their token in the query string
    app.add_middleware(FalProtocolMiddleware, registry=registry, settings=settings)

    @app.get("/health", tags=["service"], summary="Liveness (never waits on the model or the store)")
    async def health():
        info = app.state.model_info
        if info is not None and info.is_tiny:  # never silent about random weights
            return {"status": "ok", "is_tiny": True, "warning": TINY_WARNING}
        return {"status": "ok"}

    @app.get("/ready", tags=["service"],
             summary="Readiness: store and storage reachable, the model loaded (role all), live workers",
             responses={200: {"description": "Ready"}, 503: {"description": "Not ready: `status`, `detail`"}})
    async def ready():
        ok, body = await run_in_threadpool(runtime.readiness)
        body["version"] = __version__
        return JSONResponse(body, status_code=200 if ok else 503)

    app.include_router(build_queue_router(registry))
    app.include_router(build_run_router(registry))
    app.include_router(build_unserved_router(registry))  # klein families without a checkpoint: 503
    # The web playground owns "/": it comes last.
    for router in (docs.router, files.router, openai.router, metrics_routes.router, web.router):
        app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, deps.BodyHTTPException):
            return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", log_safe(request.method), log_safe(request.url.path))
        rid = request.scope.get("state", {}).get("fal_request_id")
        return JSONResponse({"detail": f"Internal server error: {type(exc).__name__}", "error_type": "internal"},
                            status_code=500, headers={deps.REQUEST_ID_HEADER: _header_safe(rid).decode("ascii")})
