"""OpenAI-compatible images API: `POST /v1/images/generations` (and `GET /v1/models`).

Point the official `openai` package at the server and it works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<a kleinserve key>")
    img = client.images.generate(prompt="a red fox", size="768x512", n=2)   # b64_json by default

Mapping onto the endpoint's input (the request goes through the SAME job queue and engine as the fal
routes: priorities, deadlines, cancellation and metrics are shared):

    prompt           -> prompt (required, non-empty)
    n                -> num_images (1..4; anything else is a 400)
    size "WxH"       -> image_size {width, height} (64..2048, rounded to a multiple of 16);
                        a preset name (square_hd, landscape_4_3, ...) is accepted too; absent or
                        "auto" -> the endpoint's default
    response_format  -> "b64_json" (default: images in the response, nothing stored: sync_mode)
                        | "url" (images stored; URLs served by this server under /files)
    output_format    -> output_format (png | jpeg | webp)
    model, quality, style, user, moderation, background "auto"/"opaque" -> accepted and ignored
    any other field of the endpoint's input (negative_prompt, seed, num_inference_steps,
    guidance_scale, acceleration, enable_safety_checker, cns_*) may be passed as is (the openai
    package's `extra_body=`).

Response: {"created", "data": [{"b64_json" | "url", "revised_prompt"}], "output_format", "size"}.
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with 400 (invalid
request), 401 (missing/invalid key: `Authorization: Bearer <key>`), 404, 500, 503, 504.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Request, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from kleinserve.schema import ENDPOINT_ID, IMAGE_SIZE_PRESETS
from kleinserve.service import jobs as J
from kleinserve.service.auth import AuthError, Principal
from kleinserve.service.jobs import new_request_id

from . import deps
from .run import submit_and_wait

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_N = 4
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX\u00d7]\s*(\d{1,5})\s*$")

# OpenAI fields we accept without effect (documented above).
_IGNORED = {"model", "quality", "style", "user", "moderation", "safety_identifier", "output_compression",
            "partial_images", "complexity"}
# OpenAI fields we understand, or refuse with a clear message.
_OPENAI_FIELDS = {"prompt", "n", "size", "response_format", "output_format", "background", "stream"} | _IGNORED


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self, request_id: Optional[str] = None) -> JSONResponse:
        headers = {**self.headers, **({"x-request-id": request_id} if request_id else {})}
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _authenticate(request: Request) -> Principal:
    """The caller's principal (the app's Authenticator); a 401 in OpenAI's error shape."""
    try:
        return request.app.state.auth.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        missing = not (request.headers.get("authorization") or "").strip()
        raise OpenAIError(
            401,
            ("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'." if missing else
             f"Incorrect API key provided. {exc.detail}"),
            type="invalid_request_error", code="invalid_api_key") from None


def _spec(request: Request) -> Any:
    registry = request.app.state.registry
    try:
        return registry.get(ENDPOINT_ID)
    except KeyError:
        return next(iter(registry))


def _parse_size(size: Any) -> Any:
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return None
    if isinstance(size, str):
        if size.strip() in IMAGE_SIZE_PRESETS:
            return size.strip()
        m = _SIZE_RE.match(size)
        if m:
            return {"width": int(m.group(1)), "height": int(m.group(2))}
    raise OpenAIError(400, f"Invalid size {size!r}: use 'WIDTHxHEIGHT' (e.g. '1024x768', each side "
                      f"64..2048, rounded to a multiple of 16), a preset ({', '.join(IMAGE_SIZE_PRESETS)}) "
                      "or 'auto'.", param="size", code="invalid_size")


def map_request(body: Any) -> tuple[dict[str, Any], str]:
    """OpenAI request JSON -> (the endpoint's input dict, response_format). Raises OpenAIError."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise OpenAIError(400, "'prompt' is required and must be a non-empty string.", param="prompt",
                          code="missing_required_parameter" if prompt is None else "invalid_value")
    if body.get("stream"):
        raise OpenAIError(400, "Streaming ('stream': true) is not supported by this server; use the fal "
                          "/stream route for progress events.", param="stream", code="unsupported_value")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise OpenAIError(400, f"Invalid response_format {response_format!r}: must be 'b64_json' or 'url'.",
                          param="response_format", code="invalid_value")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise OpenAIError(400, f"Invalid 'n' {n!r}: this server generates 1 to {MAX_N} images per request.",
                          param="n", code="invalid_value")
    background = body.get("background")
    if background not in (None, "auto", "opaque"):
        raise OpenAIError(400, f"background {background!r} is not supported (images are opaque).",
                          param="background", code="unsupported_value")
    inp: dict[str, Any] = {k: v for k, v in body.items() if k not in _OPENAI_FIELDS}
    inp["prompt"] = prompt
    inp["num_images"] = n
    size = _parse_size(body.get("size"))
    if size is not None:
        inp["image_size"] = size
    fmt = body.get("output_format")
    if fmt is not None:
        if fmt not in ("png", "jpeg", "webp"):
            raise OpenAIError(400, f"Invalid output_format {fmt!r}: must be png, jpeg or webp.",
                              param="output_format", code="invalid_value")
        inp["output_format"] = fmt
    inp["sync_mode"] = response_format == "b64_json"
    return inp, response_format


_PARAM_NAMES = {"num_images": "n", "image_size": "size", "sync_mode": "response_format"}


def _validation_error(exc: ValidationError) -> OpenAIError:
    errs = exc.errors(include_url=False)
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if not str(p)[:1].isupper() and "[" not in str(p)]
    field = loc[0] if loc else None
    param = _PARAM_NAMES.get(field, field) if field else None
    where = ".".join(loc) or "input"
    if field == "image_size" and len(loc) > 1:
        where = f"size ({loc[-1]})"
    message = f"Invalid {where}: {first.get('msg', 'invalid value')}"
    if len(errs) > 1:
        message += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
    return OpenAIError(400, message, param=param, code="invalid_value")


def _error_from_job(job: Any) -> OpenAIError:
    err = job.error or {}
    etype = err.get("error_type", J.ERR_INTERNAL)
    status = J.error_status(job)
    message = str(err.get("error") or "Generation failed.")
    if etype == J.ERR_VALIDATION:
        return OpenAIError(400, message, code="invalid_value")
    if etype == J.ERR_CANCELLED:
        return OpenAIError(400, message, code="request_cancelled")
    if etype == J.ERR_TIMEOUT:
        return OpenAIError(504 if status >= 500 else status, message, type="server_error", code="timeout")
    return OpenAIError(status if status >= 500 else 500, message, type="server_error", code=etype)


def _image_item(image: dict[str, Any], response_format: str, revised_prompt: str) -> dict[str, Any]:
    url = str(image.get("url", ""))
    item: dict[str, Any] = {}
    if response_format == "b64_json":
        if url.startswith("data:"):
            item["b64_json"] = url.split(",", 1)[1]
        else:  # should not happen (sync_mode): fall back to the URL rather than fail
            item["url"] = url
    else:
        item["url"] = url
    item["revised_prompt"] = revised_prompt
    return item


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIErrorBody(BaseModel):
    error: _OpenAIErrorDetail


_OPENAI_ERRORS = {
    400: "Invalid request (`error.param` names the field).", 401: "Missing or wrong API key.",
    429: "A queue limit is reached: retry after `Retry-After`.",
    499: "The client disconnected; the request was cancelled.", 500: "The generation failed.",
    503: "The model is not available, or the server is restarting.", 504: "The request timed out.",
}
_OPENAI_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["prompt"],
        "properties": {"prompt": {"type": "string", "minLength": 1},
                       "n": {"type": "integer", "minimum": 1, "maximum": 4},
                       "size": {"type": "string", "examples": ["1024x1024", "auto"]},
                       "response_format": {"type": "string", "enum": ["url", "b64_json"]},
                       "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]}}}}},
}


@router.post("/images/generations", summary="OpenAI-compatible image generation",
             dependencies=[Security(deps.API_KEY_SCHEME)], openapi_extra={"requestBody": _OPENAI_BODY},
             responses={200: {"description": "OpenAI's images response (`data[].url` or `b64_json`)"},
                        **{code: {"model": OpenAIErrorBody, "description": d} for code, d in _OPENAI_ERRORS.items()}})
async def images_generations(request: Request) -> JSONResponse:
    rid = new_request_id()
    try:
        principal = _authenticate(request)
        try:
            raw = await request.body()
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        inp, response_format = map_request(body)
        spec = _spec(request)
        try:
            validated = spec.validate_input(inp)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        try:
            job = await submit_and_wait(request, spec, validated, principal.owner, request_id=rid,
                                        what="OpenAI request")
        except deps.QueueFull as exc:  # backpressure: OpenAI's rate-limit shape, Retry-After kept
            raise OpenAIError(429, str(exc.detail), type="rate_limit_error", param=exc.limit,
                              code="rate_limit_exceeded", headers=exc.headers) from None
        except HTTPException as exc:  # the submit refused it (a header, or no model)
            if 400 <= exc.status_code < 500:
                raise OpenAIError(400, f"Invalid request: {exc.detail}") from None
            raise OpenAIError(exc.status_code, str(exc.detail), type="server_error",
                              code="service_unavailable" if exc.status_code == 503 else None,
                              headers={k: v for k, v in (exc.headers or {}).items()
                                       if k.lower() == "retry-after"}) from None
        if job is None:
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=499)
        if job.error is not None:
            raise _error_from_job(job)
        result = job.result or {}
        images = result.get("images") or []
        prompt = result.get("prompt", inp["prompt"])
        out: dict[str, Any] = {
            "created": int(job.finished_at or time.time()),
            "data": [_image_item(im, response_format, prompt) for im in images],
        }
        if images:
            out["size"] = f"{images[0].get('width')}x{images[0].get('height')}"
            ctype = str(images[0].get("content_type", "image/png"))
            out["output_format"] = ctype.split("/", 1)[-1]
        out["seed"] = result.get("seed")  # not OpenAI's, harmless: image k used seed + k
        out["has_nsfw_concepts"] = result.get("has_nsfw_concepts")
        return JSONResponse(out, headers={"x-request-id": rid})
    except OpenAIError as err:
        return err.response(rid)


@router.get("/models", summary="OpenAI-compatible model list", dependencies=[Security(deps.API_KEY_SCHEME)],
            responses={401: {"model": OpenAIErrorBody, "description": _OPENAI_ERRORS[401]}})
async def list_models(request: Request) -> JSONResponse:
    try:
        _authenticate(request)
    except OpenAIError as err:
        return err.response()
    data = [{"id": s.endpoint_id, "object": "model", "created": 0, "owned_by": "kleinserve"}
            for s in request.app.state.registry]
    return JSONResponse({"object": "list", "data": data})
