"""Sync run (`POST /<id>`) and streaming (`POST /<id>/stream`).

Both go THROUGH THE SAME JOB QUEUE as the queue API: the request is submitted as a durable job, then
the handler waits on its events. So priorities, deadlines, cancellation, crash recovery and the
one-job-per-device rule are the same everywhere. A client that disconnects cancels its job.

The stream sends one JSON object per SSE event:
    {"status": "IN_QUEUE", "request_id", "queue_position"}
    {"status": "IN_PROGRESS", "request_id", "step", "total"[, "preview": "data:image/jpeg;base64,..."]}
    ... and, LAST, the complete output (the same JSON as the queue result), then the stream closes.
An error after the stream started is one last event {"error", "error_type", "detail", "status_code",
"request_id"} and the stream closes.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Optional

import anyio
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from kleinserve.endpoints import EndpointRegistry, EndpointSpec, app_prefix
from kleinserve.service import jobs as J
from kleinserve.service.events import Subscription, watch
from kleinserve.service.jobs import Job, new_request_id
from kleinserve.service.store import JobStore

from . import deps
from .queue import SSE_PING_SECONDS, submit_job

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5


async def wait_until_done(request: Request, store: JobStore, job: Job, subscription: Subscription, *,
                          what: str = "sync run") -> Optional[Job]:
    """Waits for a submitted job to complete: woken by its events (`subscription`, from
    feed.subscribe before the submit), else polling. Returns the completed job, or None when the client
    disconnected first: the job is then cancelled (no GPU time for nobody). When the server is stopping
    and its --shutdown-grace is over, raises deps.ServerRestarting (503 with the request id; the job is
    not cancelled)."""
    rid = job.request_id
    while not job.is_terminal:
        await subscription.get(DISCONNECT_POLL_SECONDS)
        job = await run_in_threadpool(store.get, rid)
        if job.is_terminal:
            break
        if deps.restart_due(request):  # the server is stopping: never a cancel, never a 500
            log.info("server stopping: %s %s is answered 503 and runs again after the restart", what, rid)
            raise deps.ServerRestarting(rid, deps.request_urls(request, app_prefix(job.endpoint_id), rid))
        if deps.stopping(request):
            continue  # a client that goes away now does not cancel: the restart is not its choice
        if await request.is_disconnected():
            log.info("client of %s %s disconnected: cancelling it", what, rid)
            try:
                await run_in_threadpool(store.request_cancel, rid)
            except Exception:
                log.debug("cancel of %s after disconnect failed", rid, exc_info=True)
            return None
    return job


async def _submit_subscribed(request: Request, spec: EndpointSpec, body: Any, owner: str, mode: str,
                             request_id: Optional[str] = None) -> tuple[Job, Subscription]:
    """Submits (with a fresh request id unless given), subscribed to its events BEFORE the submit
    (so none is missed); returns (job, subscription), the caller closing the subscription. A failed
    submit closes it and raises."""
    feed = deps.services(request).feed
    rid = request_id or new_request_id()
    sub = await feed.follow(rid)
    try:
        job = await submit_job(request, spec, body, owner, mode=mode, request_id=rid)
    except BaseException:
        sub.close()
        raise
    return job, sub


async def submit_and_wait(request: Request, spec: EndpointSpec, body: Any, owner: str, *,
                          request_id: Optional[str] = None, what: str = "sync run") -> Optional[Job]:
    """Submits a run and waits for it (see wait_until_done): the completed job, or None when the
    client disconnected first."""
    job, sub = await _submit_subscribed(request, spec, body, owner, J.MODE_RUN, request_id)
    try:
        return await wait_until_done(request, deps.services(request).store, job, sub, what=what)
    finally:
        sub.close()


_RESTART = object()  # the marker _until_restart yields once the shutdown grace is over


async def _until_restart(request: Request, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The items of `source`, until the server is stopping and its shutdown grace is over: then one
    `_RESTART` marker and the end (checked every DISCONNECT_POLL_SECONDS while `source` is quiet)."""
    it = source.__aiter__()
    pending: Optional[asyncio.Future] = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_SECONDS)
            if pending in done:
                task, pending = pending, None
                try:
                    item = task.result()
                except StopAsyncIteration:
                    return
                yield item
            elif deps.restart_due(request):
                yield _RESTART
                return
    finally:
        if pending is not None:
            pending.cancel()
            try:
                await pending
            except BaseException:  # noqa: BLE001 - its cancellation or its last error: both end it
                pass
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def _make_run(spec: EndpointSpec):
    Input = spec.input_model

    async def run(request: Request, body: Input = Body(...),  # type: ignore[valid-type]
                  owner: str = Depends(deps.require_owner)):
        done = await submit_and_wait(request, spec, body, owner)
        if done is None:
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        return deps.result_response(done)

    run.__name__ = spec.route_name("run")
    return run


def _make_stream(spec: EndpointSpec):
    Input = spec.input_model

    async def stream(request: Request, body: Input = Body(...),  # type: ignore[valid-type]
                     owner: str = Depends(deps.require_owner)):
        job, sub = await _submit_subscribed(request, spec, body, owner, J.MODE_STREAM)
        sv = deps.services(request)
        store, rid = sv.store, job.request_id

        async def events():
            finished = False
            announced_progress = False
            try:
                async for ev in _until_restart(request, watch(store, sv.feed, rid, owner, steps=True,
                                                              subscription=sub)):
                    if ev is _RESTART:
                        finished = True  # not cancelled: it runs again after the restart
                        urls = deps.request_urls(request, app_prefix(spec.endpoint_id), rid)
                        log.info("server stopping: stream of %s ends; the request is kept", rid)
                        yield {"data": json.dumps(deps.ServerRestarting(rid, urls).event())}
                        return
                    if ev.kind == "progress" and ev.progress is not None:
                        announced_progress = True
                        payload: dict[str, Any] = {"status": J.IN_PROGRESS, "request_id": rid,
                                                   "step": ev.progress.step, "total": ev.progress.total}
                        if ev.progress.preview:
                            payload["preview"] = ev.progress.preview
                        yield {"data": json.dumps(payload)}
                        continue
                    job = ev.job
                    if job is None:
                        continue
                    if job.status == J.IN_QUEUE:
                        yield {"data": json.dumps({"status": J.IN_QUEUE, "request_id": rid,
                                                   "queue_position": int(ev.position or 0)})}
                    elif job.status == J.IN_PROGRESS and not announced_progress:
                        announced_progress = True
                        yield {"data": json.dumps({"status": J.IN_PROGRESS, "request_id": rid, "step": 0,
                                                   "total": job.input.get("num_inference_steps")})}
                    elif job.is_terminal:
                        finished = True
                        if job.error is None:
                            yield {"data": json.dumps(job.result or {})}
                        else:
                            yield {"data": json.dumps(deps.error_event(job))}
                        return
            finally:
                if not finished and not deps.stopping(request):
                    # The client went away: do not burn the GPU for nobody. (Not when the server is
                    # stopping: the job is kept.) Synchronous on purpose: this may run inside a
                    # cancelled task.
                    try:
                        store.request_cancel(rid)
                    except Exception:
                        log.debug("cancel of %s after disconnect failed", rid, exc_info=True)

        # sse-starlette ends streams as soon as uvicorn gets a stop signal; let ours run out the
        # shutdown grace (they end with a server_restarting event, see _until_restart).
        grace = float(request.app.state.settings.shutdown_grace) + 5.0
        return EventSourceResponse(events(), ping=SSE_PING_SECONDS, headers={deps.REQUEST_ID_HEADER: rid},
                                   shutdown_event=anyio.Event(), shutdown_grace_period=grace)

    stream.__name__ = spec.route_name("stream")
    return stream


def build_run_router(registry: EndpointRegistry) -> APIRouter:
    router = APIRouter(tags=["run"])
    for spec in registry:
        router.add_api_route(
            f"/{spec.endpoint_id}/stream", _make_stream(spec), methods=["POST"],
            summary=f"Run {spec.endpoint_id}, streaming progress (SSE); the last event is the output",
            response_class=EventSourceResponse,
            responses={200: {"description": "SSE: IN_QUEUE / IN_PROGRESS events, then the output (or one "
                                            "error event)", "content": {"text/event-stream": {}}},
                       **deps.error_responses(400, 401, 413, 422, 429, 503)},
        )
        router.add_api_route(
            f"/{spec.endpoint_id}", _make_run(spec), methods=["POST"],
            summary=f"Run {spec.endpoint_id} and wait for the output",
            response_model=None,
            responses={200: {"description": "The output"},
                       **deps.error_responses(400, 401, 413, 422, 429, 499, 500, 503, 504)},
        )
    return router
