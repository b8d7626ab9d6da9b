"""The queue API: submit / status / status stream / result / cancel (fal's wire protocol).

No `from __future__ import annotations` here: the route handlers are built per endpoint and their
body parameter is annotated with that endpoint's input model (a local variable), which FastAPI must
see as a class, not a string.
"""

import json
import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from kleinserve.endpoints import EndpointRegistry, EndpointSpec, app_prefix
from kleinserve.service import jobs as J
from kleinserve.service import metrics
from kleinserve.service.events import watch
from kleinserve.service.jobs import Job, new_request_id
from kleinserve.service.store import JobNotFound
from kleinserve.service.webhooks import InvalidWebhookUrl, validate_webhook_url

from . import deps

log = logging.getLogger(__name__)

SSE_PING_SECONDS = 5  # keep-alive comments (the JS client gives up after 15 s of silence)


def _validate_webhook(request: Request, url: Optional[str]) -> Optional[str]:
    if url is None or url == "":
        return None
    try:
        return validate_webhook_url(url, deps.services(request).net_policy)
    except InvalidWebhookUrl as exc:
        raise HTTPException(422, [{"loc": ["query", "fal_webhook"], "msg": str(exc), "type": "url_parsing"}]) from None


_REFUSAL_LOG_EVERY = 10.0  # seconds: a flood of 429s is one log line per limit per period, not one each
_last_refusal_log: dict[str, float] = {}


def _log_refusal(exc: "deps.QueueFull") -> None:
    now = time.monotonic()
    if now - _last_refusal_log.get(exc.limit, -_REFUSAL_LOG_EVERY) >= _REFUSAL_LOG_EVERY:
        _last_refusal_log[exc.limit] = now
        log.warning("submits refused with 429 (%s; kleinserve_submits_refused_total counts them): %s",
                    exc.limit, exc.detail)


async def submit_job(request: Request, spec: EndpointSpec, body: BaseModel, owner: str, *, mode: str,
                     webhook_url: Optional[str] = None, request_id: Optional[str] = None) -> Job:
    """Validated input -> a durable IN_QUEUE job (seed drawn now, so a re-run reproduces)."""
    job, _ = await _submit(request, spec, body, owner, mode=mode, webhook_url=webhook_url,
                           request_id=request_id, with_position=False)
    return job


async def _submit(request: Request, spec: EndpointSpec, body: BaseModel, owner: str, *, mode: str,
                  webhook_url: Optional[str], request_id: Optional[str],
                  with_position: bool) -> tuple[Job, Optional[int]]:
    """`submit_job`, and the job's queue position when `with_position`. The store calls (backpressure,
    submit, position) run in one trip to the thread pool: at 50 concurrent clients each extra trip
    was a wait for a thread and for the GIL."""
    store = deps.services(request).store
    runtime = deps.runtime(request)
    if runtime.engine is None and runtime.engine_error:
        # Queuing would wait forever: say why now (see /ready).
        raise HTTPException(503, f"The model failed to load, so no request can run: {runtime.engine_error}")
    timeout = deps.parse_timeout_header(request)
    priority = deps.parse_priority_header(request)
    data = body.model_dump(mode="json")
    if spec.seed_field and spec.seed_field in data and data[spec.seed_field] is None:
        data[spec.seed_field] = deps.draw_seed()
    now = time.time()
    job = Job(
        request_id=request_id or new_request_id(),
        endpoint_id=spec.endpoint_id,
        owner=owner,
        input=data,
        priority=priority,
        created_at=now,
        deadline=(now + timeout) if timeout else None,
        mode=mode,
        public_base=deps.public_base(request),
        webhook_url=webhook_url,
        extra={"no_retry": True} if deps.wants_no_retry(request) else {},
    )
    settings = request.app.state.settings

    def store_it() -> tuple[Job, Optional[int]]:
        deps.check_backpressure(store, settings, owner)
        stored = store.submit(job)
        return stored, (store.queue_position(stored.request_id) if with_position else None)

    try:
        job, position = await run_in_threadpool(store_it)
    except deps.QueueFull as exc:
        metrics.observe_submit_refused(exc.limit)
        _log_refusal(exc)
        raise
    deps.set_request_id(request, job.request_id)
    metrics.observe_job_submitted(spec.endpoint_id, priority)
    log.info("request %s submitted (%s, %s priority%s)", job.request_id, mode, priority,
             f", must start within {timeout:g}s" if timeout else "")
    return job, position


async def load_job(request: Request, request_id: str, owner: str, prefix: Optional[str],
                   *, with_logs: bool = False) -> Job:
    if not deps.is_request_id(request_id):
        raise deps.not_found(request_id)
    sv = deps.services(request)
    store, registry = sv.store, sv.registry
    deps.set_request_id(request, request_id)
    try:
        job = await run_in_threadpool(lambda: store.get(request_id, owner, with_logs=with_logs))
    except JobNotFound:
        raise deps.not_found(request_id) from None
    if prefix is not None:
        try:
            if registry.get(job.endpoint_id).app_prefix != prefix:
                raise deps.not_found(request_id)
        except KeyError:
            pass  # an endpoint no longer declared: still let its owner read it
    return job


async def status_payload(request: Request, job: Job, *, with_logs: bool,
                         position: Optional[int] = None) -> dict[str, Any]:
    """The status body of `job`; a queued job's `position` is read from the store unless given."""
    store = deps.services(request).store
    if job.status == J.IN_QUEUE and position is None:
        position = await run_in_threadpool(store.queue_position, job.request_id)
    urls = deps.request_urls(request, app_prefix(job.endpoint_id), job.request_id)
    return deps.status_body(job, urls, position=position, with_logs=with_logs)


# ------------------------------------------------------------------------------------------ routes

def _make_submit(spec: EndpointSpec):
    Input = spec.input_model

    async def submit(
        request: Request,
        body: Input = Body(...),  # type: ignore[valid-type]
        fal_webhook: Optional[str] = Query(None, description="URL to POST the result to when done."),
        owner: str = Depends(deps.require_owner),
    ):
        webhook = _validate_webhook(request, fal_webhook)
        job, position = await _submit(request, spec, body, owner, mode=J.MODE_QUEUE, webhook_url=webhook,
                                      request_id=None, with_position=True)
        urls = deps.request_urls(request, spec.app_prefix, job.request_id)
        return JSONResponse({"status": J.IN_QUEUE, "request_id": job.request_id, **urls,
                             "queue_position": int(position or 0)},
                            headers={deps.REQUEST_ID_HEADER: job.request_id})

    submit.__name__ = spec.route_name("submit")
    return submit


def _make_request_routes(prefix: str):
    async def get_status(request: Request, request_id: str, logs: Optional[str] = Query(None),
                         owner: str = Depends(deps.require_owner)):
        with_logs = deps.parse_bool_param(logs)
        job = await load_job(request, request_id, owner, prefix, with_logs=with_logs)
        body = await status_payload(request, job, with_logs=with_logs)
        return JSONResponse(body, status_code=200 if job.is_terminal else 202,
                            headers={deps.REQUEST_ID_HEADER: job.request_id})

    async def stream_status(request: Request, request_id: str, logs: Optional[str] = Query(None),
                            owner: str = Depends(deps.require_owner)):
        with_logs = deps.parse_bool_param(logs)
        await load_job(request, request_id, owner, prefix)  # 404 as plain JSON before the stream starts
        sv = deps.services(request)

        async def events():
            async for ev in watch(sv.store, sv.feed, request_id, owner, with_logs=with_logs, steps=False):
                if ev.kind == "status" and ev.job is not None:
                    body = await status_payload(request, ev.job, with_logs=with_logs, position=ev.position)
                    yield {"data": json.dumps(body)}

        return EventSourceResponse(events(), ping=SSE_PING_SECONDS,
                                   headers={deps.REQUEST_ID_HEADER: request_id})

    async def get_result(request: Request, request_id: str, owner: str = Depends(deps.require_owner)):
        job = await load_job(request, request_id, owner, prefix)
        if not job.is_terminal:
            where = "still in the queue" if job.status == J.IN_QUEUE else "still in progress"
            return JSONResponse(
                {"detail": f"Request {request_id} is {where}; poll its status_url until it is COMPLETED.",
                 "status": job.status, "request_id": request_id},
                status_code=400, headers={deps.REQUEST_ID_HEADER: request_id})
        return deps.result_response(job)

    async def cancel(request: Request, request_id: str, owner: str = Depends(deps.require_owner)):
        store = deps.services(request).store
        await load_job(request, request_id, owner, prefix)
        try:
            outcome = await run_in_threadpool(store.request_cancel, request_id, owner)
        except JobNotFound:
            raise deps.not_found(request_id) from None
        headers = {deps.REQUEST_ID_HEADER: request_id}
        if outcome.outcome == "cancelled":
            return JSONResponse({"status": "CANCELLATION_REQUESTED", "request_id": request_id,
                                 "detail": "The request was still queued: it is cancelled and will not run."},
                                status_code=202, headers=headers)
        if outcome.outcome in ("cancel_requested", "already_requested"):
            detail = ("The request is running; the cancellation is recorded. It stops at its next step and "
                      "completes as cancelled (a result it produces from now on is discarded), unless it "
                      "fails with another error first."
                      if outcome.outcome == "cancel_requested" else
                      "Cancellation was already requested: the request completes as cancelled unless it "
                      "fails with another error first.")
            return JSONResponse({"status": "CANCELLATION_REQUESTED", "request_id": request_id, "detail": detail},
                                status_code=202, headers=headers)
        job = outcome.job
        if job.error_type == J.ERR_CANCELLED:
            detail = "The request was already cancelled; nothing to cancel."
        elif job.error is not None:
            detail = f"The request already completed (failed: {job.error_type}); nothing to cancel."
        else:
            detail = "The request already completed successfully; nothing to cancel."
        return JSONResponse({"status": "ALREADY_COMPLETED", "request_id": request_id, "detail": detail},
                            status_code=400, headers=headers)

    return get_status, stream_status, get_result, cancel


def build_queue_router(registry: EndpointRegistry) -> APIRouter:
    """Routes under /queue (hosts named queue.* are mapped onto /queue by the app's middleware)."""
    router = APIRouter(prefix="/queue", tags=["queue"])
    for spec in registry:
        router.add_api_route(
            f"/{spec.endpoint_id}", _make_submit(spec), methods=["POST"],
            summary=f"Submit to {spec.endpoint_id}",
            description="Queue a request; poll status_url, then GET response_url.",
            responses={200: {"description": "Queued: request_id, response_url, status_url, cancel_url"},
                       **deps.error_responses(400, 401, 413, 422, 429, 503)},
        )
    for prefix in registry.app_prefixes():
        get_status, stream_status, get_result, cancel = _make_request_routes(prefix)
        base = f"/{prefix}/requests/{{request_id}}"
        router.add_api_route(base + "/status", get_status, methods=["GET"],
                             summary="Request status (202 while pending, 200 when COMPLETED)",
                             responses={200: {"description": "COMPLETED (with `error`/`error_type` when it failed)"},
                                        202: {"description": "IN_QUEUE (with `queue_position`) or IN_PROGRESS"},
                                        **deps.error_responses(401, 404)})
        router.add_api_route(base + "/status/stream", stream_status, methods=["GET"],
                             summary="Server-sent status events until COMPLETED",
                             response_class=EventSourceResponse,
                             responses={200: {"description": "SSE: one status object per event",
                                              "content": {"text/event-stream": {}}},
                                        **deps.error_responses(401, 404)})
        router.add_api_route(base, get_result, methods=["GET"], summary="Request result",
                             responses={200: {"description": "The output"},
                                        **deps.error_responses(400, 401, 404, 422, 500, 504)})
        router.add_api_route(base + "/cancel", cancel, methods=["PUT"], summary="Cancel a request",
                             status_code=202,
                             responses={202: {"model": deps.CancelBody,
                                              "description": "CANCELLATION_REQUESTED"},
                                        400: {"model": deps.CancelBody,
                                              "description": "ALREADY_COMPLETED: nothing to cancel"},
                                        **deps.error_responses(401, 404)})
    return router
