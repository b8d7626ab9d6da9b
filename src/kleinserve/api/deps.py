"""Shared pieces of the HTTP layer: auth dependency, request headers, URLs, status/error bodies.

Every router reaches the service parts through `services(request)` (built once by the composition
root, service/runtime.py) and the caller through `require_owner` / `require_principal`.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any, Optional

from fastapi import HTTPException, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict

from kleinserve.service import jobs as J
from kleinserve.service.auth import AuthError, Principal
from kleinserve.service.jobs import Job, error_body, error_status
from kleinserve.service.logging import request_id_var
from kleinserve.service.runtime import Runtime, Services
from kleinserve.service.settings import Settings
from kleinserve.service.store import JobStore

REQUEST_ID_HEADER = "x-fal-request-id"
TIMEOUT_HEADER = "x-fal-request-timeout"
TIMEOUT_TYPE_HEADER = "X-Fal-Request-Timeout-Type"
PRIORITY_HEADER = "x-fal-queue-priority"

# --------------------------------------------------------------------------------------- services


def services(request: Request) -> Services:
    """The process's services (store, storage, secrets, event feed, registry, settings)."""
    return request.app.state.services


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


# --------------------------------------------------------------------------------------- auth

# The API key as OpenAPI's security scheme (the docs' "Authorize" button). Checking is done by the
# app's Authenticator in require_principal; this only documents the header.
API_KEY_SCHEME = APIKeyHeader(
    name="Authorization", scheme_name="ApiKey", auto_error=False,
    description="`Key <your API key>` (fal clients) or `Bearer <your API key>` (OpenAI clients).")


def require_principal(request: Request, _documented: Optional[str] = Security(API_KEY_SCHEME)) -> Principal:
    """FastAPI dependency: the caller's principal (the app's Authenticator), or 401 with a JSON detail."""
    try:
        return request.app.state.auth.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        raise HTTPException(status_code=401, detail=exc.detail, headers={"WWW-Authenticate": "Key"}) from None


def require_owner(request: Request, _documented: Optional[str] = Security(API_KEY_SCHEME)) -> str:
    """FastAPI dependency: the caller's owner id (the API key's short sha256, or "anonymous")."""
    return require_principal(request).owner


_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_request_id(text: str) -> bool:
    """Whether `text` has the shape of a request id (a lowercase UUID, as `jobs.new_request_id` makes).
    Anything else from a URL is answered 404 and never copied into a header or a log line."""
    return isinstance(text, str) and _REQUEST_ID.fullmatch(text) is not None


def set_request_id(request: Request, request_id: str) -> None:
    """The `x-fal-request-id` every response carries (the middleware adds it); log records of the rest
    of this request carry it too (service/logging.py). Ignores text that is not a request id."""
    if not is_request_id(request_id):
        return
    request.state.fal_request_id = request_id
    request_id_var.set(request_id)


# --------------------------------------------------------------------------------------- headers


def header_error(header: str, msg: str, typ: str = "value_error") -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["header", header], "msg": msg, "type": typ}])


def parse_timeout_header(request: Request) -> Optional[float]:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise header_error("X-Fal-Request-Timeout", f"must be a number of seconds, got {raw!r}",
                           "float_parsing") from None
    if not math.isfinite(value) or value <= 0:
        raise header_error("X-Fal-Request-Timeout", f"must be a positive number of seconds, got {raw!r}",
                           "greater_than")
    return value


def parse_priority_header(request: Request) -> str:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None or raw.strip() == "":
        return J.PRIORITY_NORMAL
    value = raw.strip().lower()
    if value not in J.PRIORITIES:
        raise header_error("X-Fal-Queue-Priority", f"must be 'normal' or 'low', got {raw!r}", "literal_error")
    return value


def wants_no_retry(request: Request) -> bool:
    """`x-fal-no-retry`: a request that was running when the server died is failed, not re-run."""
    return parse_bool_param(request.headers.get("x-fal-no-retry"))


def parse_bool_param(value: Optional[str]) -> bool:
    if value is None:
        return False
    return value.strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------- URLs


def public_base(request: Request) -> str:
    """Base URL of the server as the client reached it (or --public-url)."""
    return (request.app.state.settings.public_url or str(request.base_url)).rstrip("/")


def queue_base(request: Request) -> str:
    """Base of the queue API as the client reached it: `https://host/queue` (path prefix) or
    `https://queue.host` (host-based); --public-url (+ /queue) when configured."""
    public = request.app.state.settings.public_url
    if public:
        return public.rstrip("/") + "/queue"
    state_base = request.scope.get("state", {}).get("queue_base")
    if state_base:
        return state_base
    return str(request.base_url).rstrip("/") + "/queue"


def request_urls(request: Request, app_prefix: str, request_id: str) -> dict[str, str]:
    base = f"{queue_base(request)}/{app_prefix}/requests/{request_id}"
    return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}


# --------------------------------------------------------------------------------------- seeds


def draw_seed() -> int:
    return secrets.randbelow(2**32)


# --------------------------------------------------------------------------------------- bodies


def status_body(job: Job, urls: dict[str, str], *, position: Optional[int], with_logs: bool) -> dict[str, Any]:
    """The queue status object (fal's shape; the Python client needs these exact keys)."""
    body: dict[str, Any] = {"status": job.status, "request_id": job.request_id, **urls,
                            "logs": list(job.logs) if with_logs else None}
    if job.status == J.IN_QUEUE:
        body["queue_position"] = int(position or 0)
    elif job.status == J.COMPLETED:
        body["metrics"] = job.metrics()
        if job.error:
            body["error"] = job.error.get("error")
            body["error_type"] = job.error.get("error_type")
    elif job.status == J.IN_PROGRESS and job.progress_total:
        body["progress"] = {"step": job.progress_step, "total": job.progress_total}
    if job.cancel_requested and job.status == J.IN_PROGRESS:
        body["cancel_requested"] = True
    return body


def error_headers(job: Job) -> dict[str, str]:
    headers = {REQUEST_ID_HEADER: job.request_id}
    err = job.error or {}
    if err.get("timeout_type"):
        headers[TIMEOUT_TYPE_HEADER] = str(err["timeout_type"])
    return headers


def result_response(job: Job) -> JSONResponse:
    """COMPLETED job -> the output (200) or its error body with its HTTP status."""
    if job.error is None:
        return JSONResponse(job.result or {}, status_code=200, headers={REQUEST_ID_HEADER: job.request_id})
    return JSONResponse(error_body(job), status_code=error_status(job), headers=error_headers(job))


def error_event(job: Job) -> dict[str, Any]:
    """An error inside an SSE stream (after the stream started)."""
    err = job.error or {}
    body = error_body(job)
    return {"error": err.get("error", "Request failed."), "error_type": body["error_type"],
            "detail": body["detail"], "status_code": error_status(job), "request_id": job.request_id}


QUEUE_FULL_RETRY_AFTER = 10  # seconds a refused client is told to wait
RESTART_RETRY_AFTER = 10  # seconds a client whose sync run was cut by a restart is told to wait


class BodyHTTPException(HTTPException):
    """An HTTPException whose JSON body is `body()` (the app's handler answers with it)."""

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail}


class ServerRestarting(BodyHTTPException):
    """503: the server is stopping and the request did not finish within --shutdown-grace. It was NOT
    cancelled: it runs again after the restart; poll its status_url for the result."""

    def __init__(self, request_id: str, urls: dict[str, str]):
        super().__init__(status_code=503, headers={"Retry-After": str(RESTART_RETRY_AFTER),
                                                   REQUEST_ID_HEADER: request_id},
                         detail=f"The server is restarting. Request {request_id} was not cancelled: it "
                                "continues after the restart; poll its status_url, then GET its response_url.")
        self.request_id = request_id
        self.urls = urls

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "error_type": "server_restarting", "request_id": self.request_id,
                **self.urls}

    def event(self) -> dict[str, Any]:
        """The last SSE event of a stream cut by the restart (the stream error shape)."""
        return {"error": "The server is restarting.", "error_type": "server_restarting",
                "detail": self.detail, "status_code": 503, "request_id": self.request_id, **self.urls}


def restart_due(request: Request) -> bool:
    """Whether the server is stopping and its shutdown grace is over (ServiceRuntime.restart_due)."""
    runtime = getattr(request.app.state, "runtime", None)
    return runtime is not None and runtime.restart_due()


def stopping(request: Request) -> bool:
    """Whether the server was asked to stop (a stream or sync run must then not cancel its job)."""
    runtime = getattr(request.app.state, "runtime", None)
    return runtime is not None and runtime.stopping.is_set()


class QueueFull(BodyHTTPException):
    """429: a backpressure limit (`limit`: max_queue_depth | max_queued_per_key) refused a submit."""

    def __init__(self, limit: str, value: int, detail: str, retry_after: int = QUEUE_FULL_RETRY_AFTER):
        super().__init__(status_code=429, detail=detail, headers={"Retry-After": str(retry_after)})
        self.limit = limit
        self.value = value
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "error_type": "queue_full", "limit": self.limit, "limit_value": self.value,
                "retry_after": self.retry_after}


def check_backpressure(store: JobStore, settings: Settings, owner: str) -> None:
    """Raises QueueFull when the whole queue (--max-queue-depth) or this key's share of it
    (--max-queued-per-key) is full. Counted, not reserved: concurrent submits may pass a limit by a
    few, never by many."""
    per_key = int(settings.max_queued_per_key or 0)
    if per_key and store.queued_count(owner) >= per_key:
        raise QueueFull("max_queued_per_key", per_key,
                        f"Too many queued requests for this API key (the limit is {per_key}, "
                        "--max-queued-per-key): retry after some of them have started.")
    depth = int(settings.max_queue_depth or 0)
    if depth and store.queued_count(None) >= depth:
        raise QueueFull("max_queue_depth", depth,
                        f"The queue is full (the limit is {depth} waiting requests, --max-queue-depth): "
                        "retry later.")


def not_found(request_id: str) -> HTTPException:
    """404 for a request id (named only when it is one: raw path text is never echoed)."""
    if not is_request_id(request_id):
        return HTTPException(status_code=404, detail="Request not found: request ids are UUIDs "
                             "(as returned by the submit).")
    return HTTPException(status_code=404, detail=f"Request {request_id} not found.")


# --------------------------------------------------------------------------------------- OpenAPI


class ErrorBody(BaseModel):
    """An error: `detail` says what went wrong and what to do (a list of {loc, msg, type} for 422);
    some errors add fields (`error_type`, `request_id`, `limit`, ...)."""

    model_config = ConfigDict(extra="allow")
    detail: Any


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str  # CANCELLATION_REQUESTED | ALREADY_COMPLETED
    request_id: str
    detail: str


_DESCRIPTIONS = {
    400: "Bad request (see `detail`): e.g. a body that cannot be parsed, a request not finished yet or cancelled.",
    401: "Missing or wrong API key (`Authorization: Key <key>`).",
    403: "Not allowed (e.g. an upload token for another file).",
    404: "No such request or file (or it belongs to another API key).",
    405: "Method not allowed.",
    415: "Unsupported media type (the upload's content type is not allowed).",
    413: "Request body too large (--max-request-bytes / --max-upload-bytes).",
    422: "Invalid input: `detail` lists {loc, msg, type} per problem.",
    429: "A queue limit is reached (--max-queue-depth / --max-queued-per-key): retry after `Retry-After`.",
    499: "The client disconnected before the result; the request was cancelled.",
    500: "The request failed (model error, crash, internal error): `detail`, `error_type`.",
    503: "Not available now (model failed to load, service starting, or restarting: then `request_id` "
         "to poll); see `Retry-After` when present.",
    504: "The request did not start or finish in time (`X-Fal-Request-Timeout`, --max-run-seconds).",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries for these error status codes (JSON ErrorBody each)."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}
