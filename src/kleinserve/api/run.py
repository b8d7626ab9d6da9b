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
from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from kleinserve.service import jobs as J
from kleinserve.service.events import watch
from kleinserve.service.jobs import new_request_id

from . import deps
from .endpoints import EndpointRegistry, EndpointSpec
from .queue import SSE_PING_SECONDS, _services, submit_job

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5


async def _cancel_quietly(store: Any, request_id: str) -> None:
    try:
        await run_in_threadpool(store.request_cancel, request_id)
    except Exception:
        log.debug("cancel of %s after disconnect failed", request_id, exc_info=True)


def _make_run(spec: EndpointSpec):
    Input = spec.input_model

    async def run(request: Request, body: Input = Body(...),  # type: ignore[valid-type]
                  owner: str = Depends(deps.require_owner)):
        store, hub, _ = _services(request)
        rid = new_request_id()
        sub = hub.subscribe(rid) if hub is not None else None
        try:
            job = await submit_job(request, spec, body, owner, mode=J.MODE_RUN, request_id=rid)
            while not job.is_terminal:
                if sub is not None:
                    await sub.get(DISCONNECT_POLL_SECONDS)
                else:
                    await asyncio.sleep(DISCONNECT_POLL_SECONDS)
                job = await run_in_threadpool(store.get, rid)
                if not job.is_terminal and await request.is_disconnected():
                    log.info("client of sync run %s disconnected: cancelling it", rid)
                    await _cancel_quietly(store, rid)
                    return JSONResponse({"detail": "client disconnected"}, status_code=499)
        finally:
            if sub is not None:
                sub.close()
        return deps.result_response(job)

    run.__name__ = f"run_{spec.endpoint_id.replace('/', '_').replace('-', '_').replace('.', '_')}"
    return run


def _make_stream(spec: EndpointSpec):
    Input = spec.input_model

    async def stream(request: Request, body: Input = Body(...),  # type: ignore[valid-type]
                     owner: str = Depends(deps.require_owner)):
        store, hub, _ = _services(request)
        rid = new_request_id()
        sub = hub.subscribe(rid) if hub is not None else None
        try:
            await submit_job(request, spec, body, owner, mode=J.MODE_STREAM, request_id=rid)
        except BaseException:
            if sub is not None:
                sub.close()
            raise

        async def events():
            finished = False
            announced_progress = False
            try:
                async for ev in watch(store, hub, rid, owner, steps=True, subscription=sub):
                    if ev.kind == "step" and ev.data is not None:
                        announced_progress = True
                        payload = {"status": J.IN_PROGRESS, "request_id": rid,
                                   "step": ev.data.get("step"), "total": ev.data.get("total")}
                        if ev.data.get("preview"):
                            payload["preview"] = ev.data["preview"]
                        yield {"data": json.dumps(payload)}
                        continue
                    job = ev.job
                    if job is None:
                        continue
                    if job.status == J.IN_QUEUE:
                        yield {"data": json.dumps({"status": J.IN_QUEUE, "request_id": rid,
                                                   "queue_position": int(job.extra.get("queue_position") or 0)})}
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
                if not finished:
                    # The client went away (or the server is stopping): do not burn the GPU for
                    # nobody. Synchronous on purpose: this may run inside a cancelled task.
                    try:
                        store.request_cancel(rid)
                    except Exception:
                        log.debug("cancel of %s after disconnect failed", rid, exc_info=True)

        return EventSourceResponse(events(), ping=SSE_PING_SECONDS, headers={deps.REQUEST_ID_HEADER: rid})

    stream.__name__ = f"stream_{spec.endpoint_id.replace('/', '_').replace('-', '_').replace('.', '_')}"
    return stream


def build_run_router(registry: EndpointRegistry) -> APIRouter:
    router = APIRouter(tags=["run"])
    for spec in registry:
        router.add_api_route(
            f"/{spec.endpoint_id}/stream", _make_stream(spec), methods=["POST"],
            summary=f"Run {spec.endpoint_id}, streaming progress (SSE); the last event is the output",
            response_class=EventSourceResponse,
        )
        router.add_api_route(
            f"/{spec.endpoint_id}", _make_run(spec), methods=["POST"],
            summary=f"Run {spec.endpoint_id} and wait for the output",
            response_model=None,
        )
    return router
