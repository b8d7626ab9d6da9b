"""`GET /metrics`: every kleinserve metric in the Prometheus text format (see service/metrics.py and
docs/OBSERVABILITY.md). Unauthenticated, like /health: it carries counts and timings, never prompts,
keys or images; keep the port private or filter /metrics at the proxy if that matters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from kleinserve.service import metrics

router = APIRouter(tags=["service"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
async def prometheus_metrics() -> Response:
    # Rendering reads the queue depth from the store (a small SQL query): keep it off the event loop.
    body = await run_in_threadpool(metrics.render)
    return Response(content=body, media_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"})
