"""OpenAI-compatible images API: `POST /v1/images/generations`, `POST /v1/images/edits` (and `GET /v1/models`).

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

`POST /v1/images/edits` (multipart/form-data, `client.images.edit(image=..., prompt=...)`) runs the edit
endpoint (fal-ai/flux-2/klein/9b/base/edit): `image` or `image[]` (1..4 image files) become its
`image_urls` (as data: URIs), the other form fields map as above (numbers as text); without `size`
the output takes the first image's size. `mask` is refused (no inpainting).

Response: {"created", "data": [{"b64_json" | "url", "revised_prompt"}], "output_format", "size"}.
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with 400 (invalid
request), 401 (missing/invalid key: `Authorization: Bearer <key>`), 404, 500, 503, 504.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, Optional

from fastapi import APIRouter, HTTPException, Request, Security
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kleinserve.endpoints import EndpointSpec
from kleinserve.schema import (
    EDIT_ENDPOINT_ID,
    ENDPOINT_ID,
    IMAGE_SIZE_PRESETS,
    MAX_REFERENCE_IMAGES,
    ImageSize,
    tidy_validation_errors,
)
from kleinserve.service import jobs as J
from kleinserve.service.auth import AuthError, Principal
from kleinserve.service.jobs import Job, new_request_id

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
                 headers: Optional[Mapping[str, str]] = None):
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


def _spec(request: Request, endpoint_id: str = ENDPOINT_ID) -> EndpointSpec:
    registry = request.app.state.registry
    try:
        return registry.get(endpoint_id)
    except KeyError:
        if endpoint_id != ENDPOINT_ID:
            raise OpenAIError(404, f"This server does not serve {endpoint_id}.", code="model_not_found") from None
        return next(iter(registry))


# ---------------------------------------------------------------------------------- the schema
# The route reads its body itself (to answer in OpenAI's error shape); these models document it in
# /openapi.json (`openapi_extra` below) and are what docs/OPENAI.md describes.

_MIN_SIDE = next(m.ge for m in ImageSize.model_fields["width"].metadata if getattr(m, "ge", None) is not None)
_MAX_SIDE = next(m.le for m in ImageSize.model_fields["width"].metadata if getattr(m, "le", None) is not None)


class OpenAIImageRequest(BaseModel):
    """OpenAI's images.generate request, as this server reads it. Any other field of the endpoint's
    input (negative_prompt, seed, num_inference_steps, guidance_scale, acceleration,
    enable_safety_checker, cns_*) may be added as is (the openai package's `extra_body=`)."""

    model_config = ConfigDict(extra="allow", title="OpenAIImageRequest")

    prompt: str = Field(..., min_length=1, description="The prompt (required, non-empty).")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Number of images, 1..{MAX_N}.")
    size: Optional[str] = Field(
        None, examples=["1024x768", "auto", "landscape_4_3"],
        description=(f"'WIDTHxHEIGHT' (each side {_MIN_SIDE}..{_MAX_SIDE}, rounded to a multiple of 16), a "
                     f"preset ({', '.join(IMAGE_SIZE_PRESETS)}), or 'auto' / absent: the endpoint's default "
                     "(1024x768)."))
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json: images in the response, nothing stored; url: images stored and "
                                "served by this server under /files.")
    output_format: Optional[Literal["png", "jpeg", "webp"]] = Field(None, description="Image file format (png).")
    background: Optional[Literal["auto", "opaque"]] = Field(None, description="Only opaque images are made.")
    stream: Optional[bool] = Field(None, description="Not supported (400 when true): use the fal /stream route.")
    model: Optional[str] = Field(None, description="Accepted and ignored (this server serves one model).")
    quality: Optional[str] = Field(None, description="Accepted and ignored.")
    style: Optional[str] = Field(None, description="Accepted and ignored.")
    user: Optional[str] = Field(None, description="Accepted and ignored.")


class OpenAIImage(BaseModel):
    b64_json: Optional[str] = Field(None, description="The image file, base64 (response_format b64_json).")
    url: Optional[str] = Field(None, description="Where the stored image is served (response_format url).")
    revised_prompt: str


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    size: Optional[str] = Field(None, description="'WIDTHxHEIGHT' generated.")
    output_format: Optional[str] = None
    seed: Optional[int] = Field(None, description="Not OpenAI's: image k was made with seed + k.")
    has_nsfw_concepts: Optional[list[bool]] = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined (openapi_extra does not register components)."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _inline(OpenAIErrorResponse)}}}


OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline(OpenAIImageRequest),
        "example": {"prompt": "a red fox in the snow", "size": "1024x768", "n": 1, "response_format": "b64_json",
                    "negative_prompt": "blurry", "seed": 42}}}},
    "responses": {
        "200": {"description": "The images",
                "content": {"application/json": {"schema": _inline(OpenAIImagesResponse)}}},
        "400": _error_response("Invalid request (OpenAI's error shape; `param` names the field)"),
        "401": _error_response("Missing or invalid API key (`Authorization: Bearer <key>`)"),
        "500": _error_response("Generation failed"),
        "503": _error_response("No model loaded yet"),
        "504": _error_response("Timed out"),
    },
}


def _parse_size(size: Any) -> Any:
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return None
    usage = (f"use 'WIDTHxHEIGHT' with each side {_MIN_SIDE}..{_MAX_SIDE} (e.g. '1024x768'; rounded to a "
             f"multiple of 16), a preset ({', '.join(IMAGE_SIZE_PRESETS)}) or 'auto'")
    if isinstance(size, str):
        if size.strip() in IMAGE_SIZE_PRESETS:
            return size.strip()
        m = _SIZE_RE.match(size)
        if m:
            width, height = int(m.group(1)), int(m.group(2))
            bad = [f"{name} {v}" for name, v in (("width", width), ("height", height))
                   if not _MIN_SIDE <= v <= _MAX_SIDE]
            if bad:
                raise OpenAIError(400, f"Invalid size {size!r}: {' and '.join(bad)} out of range; {usage}.",
                                  param="size", code="invalid_size")
            return {"width": width, "height": height}
    raise OpenAIError(400, f"Invalid size {size!r}: {usage}.", param="size", code="invalid_size")


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
    """The endpoint's validation errors in OpenAI's terms: one message naming each bad parameter
    (`n`, `size`, `response_format` for the fields they map onto), `param` the first of them."""
    errs = tidy_validation_errors(exc.errors(include_url=False))
    problems = []
    param = None
    for e in errs:
        loc = [str(p) for p in e.get("loc", ())]
        field = loc[0] if loc else None
        name = _PARAM_NAMES.get(field, field) if field else "input"
        if field == "image_size" and len(loc) > 1:
            name = f"size ({loc[-1]})"
        param = param or (_PARAM_NAMES.get(field, field) if field else None)
        problems.append(f"{name}: {e.get('msg', 'invalid value')}")
    message = "Invalid request: " + ("; ".join(problems) or "invalid input")
    return OpenAIError(400, message, param=param, code="invalid_value")


def _error_from_job(job: Job) -> OpenAIError:
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


_OPENAI_ERRORS = {
    400: "Invalid request (`error.param` names the field).", 401: "Missing or wrong API key.",
    429: "A queue limit is reached: retry after `Retry-After`.",
    499: "The client disconnected; the request was cancelled.", 500: "The generation failed.",
    503: "The model is not available, or the server is restarting.", 504: "The request timed out.",
}


@router.post("/images/generations", summary="OpenAI-compatible image generation (docs/OPENAI.md)",
             description="OpenAI's `images.generate` on this server: the request goes through the same job "
                         "queue and engine as the fal routes. Authenticate with `Authorization: Bearer <key>`. "
                         "Errors use OpenAI's shape `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
             dependencies=[Security(deps.API_KEY_SCHEME)], openapi_extra=OPENAPI_EXTRA,
             responses={**{code: {"model": OpenAIErrorResponse, "description": d}
                           for code, d in _OPENAI_ERRORS.items()}})
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
        return await _run(request, rid, principal, _spec(request), inp, response_format)
    except OpenAIError as err:
        return err.response(rid)


async def _run(request: Request, rid: str, principal: Principal, spec: Any, inp: dict[str, Any],
               response_format: str) -> JSONResponse:
    """Validate `inp` for `spec`, run it through the queue and answer in OpenAI's shape."""
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


_IMAGE_FIELDS = ("image", "image[]")
_FORM_INTS = ("n", "seed", "num_inference_steps")
_FORM_FLOATS = ("guidance_scale",)


async def _edit_body(request: Request) -> tuple[dict[str, Any], list[str]]:
    """The multipart form of an edit as (the OpenAI body, data: URIs of its images). Raises OpenAIError."""
    import base64

    from starlette.datastructures import UploadFile

    limit = int(getattr(request.app.state.services.settings, "max_input_image_bytes", 20 * 1024 * 1024))
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise OpenAIError(400, "An image edit is a multipart/form-data request with 'image' file(s) and a "
                          "'prompt'.", code="invalid_content_type")
    try:
        form = await request.form(max_files=MAX_REFERENCE_IMAGES + 2, max_fields=200)
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException and friends
        raise OpenAIError(400, f"Invalid multipart form: {exc}", code="invalid_form") from None
    if form.getlist("mask"):
        raise OpenAIError(400, "'mask' is not supported: this server edits whole images by the prompt.",
                          param="mask", code="unsupported_value")
    files = [f for name in _IMAGE_FIELDS for f in form.getlist(name)]
    if not files:
        raise OpenAIError(400, "'image' is required: 1 to 4 image files.", param="image",
                          code="missing_required_parameter")
    if len(files) > MAX_REFERENCE_IMAGES:
        raise OpenAIError(400, f"At most {MAX_REFERENCE_IMAGES} images per edit, got {len(files)}.",
                          param="image", code="invalid_value")
    uris = []
    for k, f in enumerate(files):
        if not isinstance(f, UploadFile):
            raise OpenAIError(400, f"image[{k}] must be a file, not a text field.", param="image", code="invalid_value")
        data = await f.read(limit + 1)
        if len(data) > limit:
            raise OpenAIError(400, f"image[{k}] is larger than {limit} bytes.", param="image", code="invalid_value")
        mime = f.content_type or "application/octet-stream"
        uris.append(f"data:{mime};base64," + base64.b64encode(data).decode())
    body: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in _IMAGE_FIELDS or isinstance(value, UploadFile):
            continue
        body[name] = value
    for name in _FORM_INTS + _FORM_FLOATS:  # form fields are text
        if isinstance(body.get(name), str):
            try:
                body[name] = int(body[name]) if name in _FORM_INTS else float(body[name])
            except ValueError:
                raise OpenAIError(400, f"Invalid {name!r}: {body[name]!r} is not a number.", param=name,
                                  code="invalid_value") from None
    return body, uris


_EDIT_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["prompt", "image"],
        "properties": {"prompt": {"type": "string"},
                       "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "maxItems": MAX_REFERENCE_IMAGES},
                       "n": {"type": "integer", "minimum": 1, "maximum": 4},
                       "size": {"type": "string", "examples": ["1024x1024", "auto"]},
                       "response_format": {"type": "string", "enum": ["url", "b64_json"]}}}}},
}


@router.post("/images/edits", summary="OpenAI-compatible image edit (reference images; docs/OPENAI.md)",
             description="OpenAI's `images.edit` on this server: multipart `image` / `image[]` (1 to "
                         f"{MAX_REFERENCE_IMAGES} reference images), `prompt`, `n`, `size`, `response_format`; "
                         "runs the edit endpoint through the same job queue. Errors use OpenAI's shape.",
             dependencies=[Security(deps.API_KEY_SCHEME)], openapi_extra={"requestBody": _EDIT_BODY},
             responses={code: {"model": OpenAIErrorResponse, "description": d} for code, d in _OPENAI_ERRORS.items()})
async def images_edits(request: Request) -> JSONResponse:
    rid = new_request_id()
    try:
        principal = _authenticate(request)
        spec = _spec(request, EDIT_ENDPOINT_ID)
        body, uris = await _edit_body(request)
        inp, response_format = map_request(body)
        inp["image_urls"] = uris
        return await _run(request, rid, principal, spec, inp, response_format)
    except OpenAIError as err:
        return err.response(rid)


@router.get("/models", summary="OpenAI-compatible model list", dependencies=[Security(deps.API_KEY_SCHEME)],
            responses={401: {"model": OpenAIErrorResponse, "description": _OPENAI_ERRORS[401]}})
async def list_models(request: Request) -> JSONResponse:
    try:
        _authenticate(request)
    except OpenAIError as err:
        return err.response()
    data = [{"id": s.endpoint_id, "object": "model", "created": 0, "owned_by": "kleinserve"}
            for s in request.app.state.registry]
    return JSONResponse({"object": "list", "data": data})
