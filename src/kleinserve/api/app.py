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

The engine runs in a worker thread (service/worker.py); the HTTP event loop never waits on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from kleinserve import __version__
from kleinserve.service import metrics
from kleinserve.service.auth import Authenticator
from kleinserve.service.events import EventHub
from kleinserve.service.jobs import validation_detail
from kleinserve.service.logging import install_access_log_redaction, request_id_var
from kleinserve.service.settings import Settings
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.storage import FileStorage, LocalFileStorage
from kleinserve.service.store import JobStore
from kleinserve.service.webhooks import WebhookDispatcher
from kleinserve.service.worker import Maintenance, Worker

from . import deps, files, openai, web
from . import metrics as metrics_routes
from .endpoints import EndpointRegistry, default_registry
from .families import build_unserved_router
from .queue import build_queue_router
from .run import build_run_router

log = logging.getLogger(__name__)

# Paths whose bodies are file uploads (limited by --max-upload-bytes instead of --max-request-bytes).
UPLOAD_PATH_PREFIXES = ("/storage/", "/files/")

TINY_WARNING = ("SERVING THE TINY RANDOM MODEL: outputs are noise, NOT FLUX.2 [klein]. "
                "Start with --model auto (or a model folder / repo id) for real images.")


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
                    rid = str(state.get("fal_request_id", ""))
                    headers.append((b"x-fal-request-id", rid.encode("latin-1")))
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


def _too_large_detail(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes."


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------ runtime

class ServiceRuntime:
    """The background parts of one app: store, event hub, worker, maintenance, webhook dispatcher,
    engine (possibly loading in the background)."""

    def __init__(self, app: FastAPI, settings: Settings, *, engine: Any, store: Optional[JobStore],
                 registry: EndpointRegistry, load_engine: bool, start_worker: bool):
        self.app = app
        self.settings = settings
        self.engine = engine
        self.engine_error: Optional[str] = None
        self.engine_loading = False
        self.warmup_seconds: float | None = None  # compile time spent at startup (None: not warmed)
        self.registry = registry
        self._own_store = store is None
        self.store: Optional[JobStore] = store
        self.hub = EventHub()
        self.worker: Optional[Worker] = None
        self.maintenance: Optional[Maintenance] = None
        self.dispatcher: Optional[WebhookDispatcher] = None
        self.storage: Optional[FileStorage] = None
        self.load_engine = load_engine
        self.start_worker = start_worker
        self._loader: Optional[threading.Thread] = None

    # -------------------------------------------------------------- start / stop
    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if self.store is None:
            self.store = SQLiteJobStore.in_data_dir(s.data_dir)
        self.store.add_listener(self.hub.store_listener)
        self.app.state.store = self.store
        self.storage = self._make_storage()
        self.maintenance = Maintenance(self.store, settings=s, storage=self.storage)
        recovered = self.maintenance.recover_now()  # a previous process died: its running jobs
        if recovered:
            log.warning("recovered %d request(s) interrupted by a previous crash", len(recovered))
        metrics.set_queue_depth_source(self.store.queue_depth)
        self.dispatcher = self._make_dispatcher()
        if self.start_worker:
            self.worker = Worker(self.store, self.engine, registry=self.registry, storage=self.storage,
                                 hub=self.hub, settings=s, on_complete=self._on_complete)
            self.worker.start()
        self.maintenance.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.engine is not None:
            self._announce_engine(self.engine)
        elif self.load_engine:
            self.engine_loading = True
            self._loader = threading.Thread(target=self._load_engine, name="kleinserve-engine-loader", daemon=True)
            self._loader.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=60.0, abort_running=True)
        if self.maintenance is not None:
            self.maintenance.stop()
        if self.dispatcher is not None:
            try:
                self.dispatcher.stop()
            except Exception:
                log.exception("stopping the webhook dispatcher failed")
        if self.store is not None:
            self.store.remove_listener(self.hub.store_listener)
            if self._own_store:
                self.store.close()

    # -------------------------------------------------------------- parts
    def _make_storage(self) -> FileStorage:
        try:
            return files.storage_services(self.app).storage
        except Exception:
            log.exception("could not set up the file storage via api.files")
        return LocalFileStorage.in_data_dir(self.settings.data_dir, max_upload_bytes=self.settings.max_upload_bytes)

    def _make_dispatcher(self) -> Optional[WebhookDispatcher]:
        try:
            return WebhookDispatcher(self.store, files.storage_services(self.app).signer,
                                     max_attempts=self.settings.webhook_max_attempts,
                                     backoff_base=self.settings.webhook_backoff_base)
        except Exception:
            log.exception("could not set up webhook delivery")
            return None

    def _on_complete(self, job: Any) -> None:
        if job.webhook_url and self.dispatcher is not None:
            self.dispatcher.notify()

    def _load_engine(self) -> None:
        s = self.settings
        try:
            from kleinserve.engine import load_engine

            log.info("loading model %r ...", s.model)
            engine = load_engine(s.model, device=s.device, dtype=s.dtype, cpu_offload=s.cpu_offload)
            if not s.no_warmup:  # before /ready says yes: the first request must not be the one compiling
                self.warmup_seconds = sum(engine.warmup().values())
        except Exception as exc:
            self.engine_error = f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", self.engine_error)
        else:
            self.set_engine(engine)
        finally:
            self.engine_loading = False

    def set_engine(self, engine: Any) -> None:
        self.engine = engine
        self.app.state.engine = engine
        self._announce_engine(engine)
        if self.worker is not None:
            self.worker.set_engine(engine)

    def _announce_engine(self, engine: Any) -> None:
        info = engine.info
        self.app.state.model_info = info
        metrics.observe_model_loaded(info)
        if info.is_tiny:
            for line in ("!" * 78, "!! " + TINY_WARNING, "!" * 78):
                log.warning(line)
        else:
            log.info("model ready: %s on %s (%s), loaded in %.1fs", info.source, info.device, info.dtype,
                     info.load_seconds)

    # -------------------------------------------------------------- readiness
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        info = self.engine.info if self.engine is not None else None
        worker_ok = self.worker is None or self.worker.alive
        body: dict[str, Any] = {"ready": False, "version": __version__}
        if info is not None:
            body["model"] = {**dataclasses.asdict(info), "warmup_seconds": self.warmup_seconds}
            body["is_tiny"] = info.is_tiny
            if body["is_tiny"]:
                body["warning"] = TINY_WARNING
        if self.engine is None:
            if self.engine_error:
                body["status"] = "failed"
                body["detail"] = f"The model failed to load: {self.engine_error}"
            elif self.engine_loading:
                body["status"] = "loading"
                body["detail"] = f"The model {self.settings.model!r} is loading."
            else:
                body["status"] = "no_model"
                body["detail"] = "No model is loaded."
            return False, body
        if not worker_ok:
            body["status"] = "worker_stopped"
            body["detail"] = "The worker thread is not running."
            return False, body
        body["ready"] = True
        body["status"] = "ready"
        return True, body


# ------------------------------------------------------------------------------------ the app

def create_app(
    settings: Optional[Settings] = None,
    engine: Any = None,
    *,
    store: Optional[JobStore] = None,
    registry: Optional[EndpointRegistry] = None,
    load_engine: bool = False,
    start_worker: bool = True,
) -> FastAPI:
    """Builds the app. Background parts (worker, maintenance, webhooks) start with the app's lifespan
    (uvicorn, or `with TestClient(app)`).

    engine: a loaded Engine; None with `load_engine=True` loads `settings.model` in the background
      (/ready says 503 until it is up); None otherwise leaves jobs queued until `set_engine`.
    store: a JobStore (default: SQLite under settings.data_dir).
    """
    settings = settings or Settings.from_sources()
    registry = registry or default_registry()
    auth = Authenticator.from_settings(settings)  # refuses to build without keys or --no-auth

    runtime_holder: dict[str, ServiceRuntime] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = runtime_holder["rt"]
        await run_in_threadpool(runtime.start)
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    app = FastAPI(
        title="kleinserve",
        version=__version__,
        description=("Self-hosted, fal-compatible inference service. Authenticate with "
                     "`Authorization: Key <your key>`. Queue API under `/queue` (or a `queue.*` host); "
                     "sync run and streaming at the root."),
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    runtime = ServiceRuntime(app, settings, engine=engine, store=store, registry=registry,
                             load_engine=load_engine, start_worker=start_worker)
    runtime_holder["rt"] = runtime
    app.state.settings = settings
    app.state.auth = auth
    app.state.registry = registry
    app.state.runtime = runtime
    app.state.engine = engine
    app.state.store = store
    app.state.hub = runtime.hub

    _install_error_handlers(app)
    install_access_log_redaction()  # upload URLs carry their token in the query string
    app.add_middleware(FalProtocolMiddleware, registry=registry, settings=settings)

    @app.get("/health", tags=["service"], summary="Liveness (never waits on the model)")
    async def health():
        info = getattr(app.state, "model_info", None)
        if info is not None and info.is_tiny:  # never silent about random weights
            return {"status": "ok", "is_tiny": True, "warning": TINY_WARNING}
        return {"status": "ok"}

    @app.get("/ready", tags=["service"], summary="Readiness: the model is loaded and the worker runs")
    async def ready():
        ok, body = runtime.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    app.include_router(build_queue_router(registry))
    app.include_router(build_run_router(registry))
    app.include_router(build_unserved_router(registry))  # klein families without a checkpoint: 503
    # The web playground owns "/": it comes last.
    for router in (files.router, openai.router, metrics_routes.router, web.router):
        app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        rid = request.scope.get("state", {}).get("fal_request_id") or str(uuid.uuid4())
        return JSONResponse({"detail": f"Internal server error: {type(exc).__name__}", "error_type": "internal"},
                            status_code=500, headers={deps.REQUEST_ID_HEADER: rid})
