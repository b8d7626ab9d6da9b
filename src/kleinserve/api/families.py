"""Endpoints of klein families this server has no checkpoint for: a 503 that says how to enable them.

The registry lists them (`EndpointRegistry.unserved`, filled by `endpoints.default_registry`); this
router answers their run, stream and queue-submit routes, so a client gets a reason instead of a bare
404 (`Retry-After` is not set: retrying will not help until the server is restarted with the model).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from kleinserve.endpoints import EndpointRegistry

UNSERVED_STATUS = 503


def build_unserved_router(registry: EndpointRegistry) -> APIRouter:
    router = APIRouter()
    for endpoint_id, message in registry.unserved.items():
        def answer(message: str = message) -> JSONResponse:
            return JSONResponse({"detail": message, "error_type": "endpoint_not_served"},
                                status_code=UNSERVED_STATUS)

        name = endpoint_id.replace("/", "_").replace("-", "_").replace(".", "_")
        for path, kind in ((f"/{endpoint_id}", "run"), (f"/{endpoint_id}/stream", "stream"),
                           (f"/queue/{endpoint_id}", "submit")):
            router.add_api_route(path, answer, methods=["POST"], include_in_schema=False,
                                 name=f"unserved_{kind}_{name}")
    return router
