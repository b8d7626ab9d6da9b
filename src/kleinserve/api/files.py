"""Storage endpoints (the upload protocols of both official fal clients), file downloads and the
webhook JWKS.

    POST /storage/upload/initiate?storage_type=fal-cdn-v3|gcs     API key -> {upload_url, file_url}
    PUT  /storage/upload/{file_id}?token=...                       the signed upload_url (no auth)
    POST /storage/upload/initiate-multipart?storage_type=...       API key -> {upload_url, file_url}
    PUT  /storage/upload/multipart/{upload_id}/{part}?token=...    -> {partNumber, etag}
    POST /storage/upload/multipart/{upload_id}/complete?token=...  {parts} -> {file_url}
    POST /storage/auth/token?storage_type=fal-cdn-v3               API key -> {token, token_type,
                                                                   base_url, expires_at}
    POST /files/upload                                             CDN token or API key -> {access_url}
    POST /files/upload/multipart                                   -> {access_url, uploadId}
    PUT  /files/{id}/{name}/multipart/{upload_id}/{part}           -> ETag header
    POST /files/{id}/{name}/multipart/{upload_id}/complete         {parts} -> {access_url}
    GET  /files/{id}/{name}                                        the file (no auth: the random id is
                                                                   the capability, like fal's CDN);
                                                                   streamed from any backend, with Range
                                                                   (or a 307 to a presigned URL with
                                                                   --storage-redirect)
    GET  /.well-known/jwks.json                                    the webhook signing key

The JS client (`fal.storage.upload`) uses `initiate` + PUT (multipart above 90 MiB); the Python
client (`fal_client.upload*`) uses `auth/token` + `POST /files/upload` (multipart above 100 MiB) and
falls back to `initiate?storage_type=gcs` + PUT. See docs/STORAGE_WEBHOOKS.md.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn, Optional

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Security
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from kleinserve.service.runtime import Services
from kleinserve.service.storage import (
    ExpiredToken,
    FileNotFound,
    FileStream,
    InvalidToken,
    StorageError,
    StorageUnavailable,
    StoredFile,
    is_valid_file_id,
    new_file_id,
    normalize_content_type,
    sanitize_file_name,
)
from kleinserve.service.webhooks import JWKS_MAX_AGE

from . import deps
from .deps import API_KEY_SCHEME, error_responses, public_base, require_owner

log = logging.getLogger(__name__)

router = APIRouter(tags=["storage"])

STORAGE_TYPES = {"fal-cdn-v3", "fal-cdn", "gcs"}
UPLOAD_TOKEN_TTL = 15 * 60.0  # signed single upload URL
MULTIPART_TOKEN_TTL = 6 * 3600.0  # signed multipart upload URL (large files take a while)
CDN_TOKEN_TTL = 3600.0  # the Python client's bearer token; it refreshes it when expired
WRITE_CHUNK = 1 << 20
PRESIGNED_GET_TTL = 15 * 60.0  # --storage-redirect: how long a presigned URL a 307 points at lives


# --------------------------------------------------------------------------------------------------
# the objects this router needs, kept on app.state


def _raise(exc: StorageError) -> NoReturn:
    headers = None
    if isinstance(exc, StorageUnavailable):
        headers = {"Retry-After": str(exc.retry_after)}
    raise HTTPException(status_code=exc.status_code, detail=exc.detail, headers=headers)


# --------------------------------------------------------------------------------------------------
# auth


def _cdn_or_api_key_owner(request: Request,
                          _documented: Optional[str] = Security(API_KEY_SCHEME)) -> Optional[str]:
    """`POST /files/upload` and friends: the CDN token from /storage/auth/token (what the Python
    client sends, `Authorization: Bearer <token>`) or else a normal API key."""
    authz = request.headers.get("authorization", "")
    scheme, _, value = authz.partition(" ")
    if scheme.lower() == "bearer" and value.count(".") == 1:
        try:
            claims = deps.services(request).tokens.verify(value.strip(), "cdn")
        except ExpiredToken as exc:
            _raise(exc)  # the client refreshes its token on its own schedule: say why
        except InvalidToken:
            pass  # not one of our tokens: maybe an API key sent as a bearer token
        else:
            return claims.get("o")
    return require_owner(request)


# --------------------------------------------------------------------------------------------------
# helpers


class InitiateUploadBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    content_type: Optional[str] = None
    file_name: Optional[str] = None


def _check_storage_type(
    storage_type: Optional[str] = Query(None, json_schema_extra={"enum": sorted(STORAGE_TYPES)},
                                        description="The fal clients' storage type (all are stored here)."),
) -> None:
    """A dependency of the upload routes: the fal clients send `?storage_type=`; all are stored here."""
    if storage_type is not None and storage_type not in STORAGE_TYPES:
        raise HTTPException(
            status_code=400,
            detail=f"unsupported storage_type {storage_type!r}; use one of {sorted(STORAGE_TYPES)}",
        )


def _lifecycle_expires_in(request: Request) -> Optional[float]:
    """`expiration_duration_seconds` from the clients' object lifecycle headers, if any."""
    for name in ("x-fal-object-lifecycle", "x-fal-object-lifecycle-preference"):
        raw = request.headers.get(name)
        if not raw:
            continue
        try:
            seconds = json.loads(raw).get("expiration_duration_seconds")
            if seconds is not None and float(seconds) > 0:
                return float(seconds)
        except (ValueError, AttributeError, TypeError):
            continue
    return None


def _check_declared_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise HTTPException(status_code=400, detail="invalid Content-Length") from None
        if n > limit:
            raise HTTPException(
                status_code=413, detail=f"file exceeds the upload limit of {limit} bytes"
            )


async def _pump(request: Request, writer: Any) -> None:
    """Streams the request body into `writer` (an UploadWriter or PartWriter) in ~1 MiB writes
    done off the event loop; aborts the writer on any failure."""
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) >= WRITE_CHUNK:
                data, buf = bytes(buf), bytearray()
                await run_in_threadpool(writer.write, data)
        if buf:
            await run_in_threadpool(writer.write, bytes(buf))
    except BaseException:
        writer.abort()
        raise


async def _store_body(
    request: Request,
    svc: Services,
    *,
    content_type: Optional[str],
    file_name: Optional[str],
    owner: Optional[str],
    file_id: Optional[str] = None,
    expires_in: Optional[float] = None,
):
    _check_declared_length(request, svc.storage.max_upload_bytes)
    try:
        writer = svc.storage.writer(
            content_type, file_name, owner, file_id=file_id, expires_in=expires_in
        )
        await _pump(request, writer)
        return await run_in_threadpool(writer.commit)
    except StorageError as exc:
        _raise(exc)


def _uploaded_body(request: Request, svc: Services, stored: StoredFile, url_key: str) -> dict[str, Any]:
    """The answer to a finished single-request upload; the file's URL under `url_key` (the JS
    client reads `file_url`, the Python client `access_url`)."""
    return {
        url_key: stored.url(public_base(request)),
        "content_type": stored.content_type,
        "file_name": stored.file_name,
        "file_size": stored.size,
    }


def _parts_from_body(body: Any) -> Optional[list[int]]:
    parts = body.get("parts") if isinstance(body, dict) else None
    if parts is None:
        return None
    try:
        return [int(p["partNumber"]) for p in parts]
    except (TypeError, KeyError, ValueError):
        raise HTTPException(
            status_code=400, detail='"parts" must be a list of {"partNumber", "etag"}'
        ) from None


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise HTTPException(status_code=400, detail="body is not valid JSON") from None


# --------------------------------------------------------------------------------------------------
# JS client (and the Python client's fallback): initiate + signed PUT


@router.post("/storage/upload/initiate", responses=error_responses(400, 401, 415, 422))
async def initiate_upload(
    request: Request,
    body: InitiateUploadBody,
    owner: Optional[str] = Depends(require_owner),
    _storage_type: None = Depends(_check_storage_type),  # after the credentials: a 401 comes first
):
    svc = deps.services(request)
    try:
        ctype = normalize_content_type(body.content_type)
    except StorageError as exc:
        _raise(exc)
    name = sanitize_file_name(body.file_name, ctype)
    file_id = new_file_id()
    claims: dict[str, Any] = {"f": file_id, "n": name, "t": ctype, "o": owner}
    expires_in = _lifecycle_expires_in(request)
    if expires_in:
        claims["x"] = expires_in
    token, _ = svc.tokens.issue("put", UPLOAD_TOKEN_TTL, **claims)
    base = public_base(request)
    return {
        "upload_url": f"{base}/storage/upload/{file_id}?token={token}",
        "file_url": f"{base}/files/{file_id}/{name}",
    }


@router.put("/storage/upload/{file_id}", responses=error_responses(400, 401, 403, 413, 415, 422))
async def put_signed_upload(request: Request, file_id: str, token: Optional[str] = Query(None)):
    svc = deps.services(request)
    try:
        claims = svc.tokens.verify(token, "put")
    except StorageError as exc:
        _raise(exc)
    if claims.get("f") != file_id or not is_valid_file_id(file_id):
        raise HTTPException(status_code=403, detail="upload token not valid for this file")
    stored = await _store_body(
        request,
        svc,
        content_type=claims.get("t"),
        file_name=claims.get("n"),
        owner=claims.get("o"),
        file_id=file_id,
        expires_in=claims.get("x"),
    )
    return _uploaded_body(request, svc, stored, "file_url")


@router.post("/storage/upload/initiate-multipart", responses=error_responses(400, 401, 415, 422))
async def initiate_multipart_upload(
    request: Request,
    body: InitiateUploadBody,
    owner: Optional[str] = Depends(require_owner),
    _storage_type: None = Depends(_check_storage_type),  # after the credentials: a 401 comes first
):
    svc = deps.services(request)
    mp = await _create_multipart(request, svc, body.content_type, body.file_name, owner)
    token, _ = svc.tokens.issue("mp", MULTIPART_TOKEN_TTL, u=mp.upload_id)
    base = public_base(request)
    return {
        "upload_url": f"{base}/storage/upload/multipart/{mp.upload_id}?token={token}",
        "file_url": mp.file.url(base),
    }


def _check_mp_token(svc: Services, token: Optional[str], upload_id: str) -> None:
    try:
        claims = svc.tokens.verify(token, "mp")
    except StorageError as exc:
        _raise(exc)
    if claims.get("u") != upload_id:
        raise HTTPException(status_code=403, detail="upload token not valid for this upload")


async def _create_multipart(
    request: Request,
    svc: Services,
    content_type: Optional[str],
    file_name: Optional[str],
    owner: Optional[str],
):
    try:
        return await run_in_threadpool(
            svc.storage.create_multipart,
            content_type,
            file_name,
            owner,
            expires_in=_lifecycle_expires_in(request),
        )
    except StorageError as exc:
        _raise(exc)


async def _put_part(request: Request, svc: Services, upload_id: str, part_number: int) -> str:
    _check_declared_length(request, svc.storage.max_upload_bytes)
    try:
        writer = await run_in_threadpool(svc.storage.multipart_part_writer, upload_id, part_number)
        await _pump(request, writer)
        return await run_in_threadpool(writer.commit)
    except StorageError as exc:
        _raise(exc)


async def _complete(request: Request, svc: Services, upload_id: str):
    parts = _parts_from_body(await _json_body(request))
    try:
        return await run_in_threadpool(svc.storage.complete_multipart, upload_id, parts)
    except StorageError as exc:
        _raise(exc)


@router.put("/storage/upload/multipart/{upload_id}/complete", include_in_schema=False)
@router.put("/files/{file_id}/{file_name}/multipart/{upload_id}/complete", include_in_schema=False)
async def complete_needs_post() -> None:
    """`PUT .../complete`: the method is wrong (405), not the part number (422)."""
    raise HTTPException(status_code=405, detail="Complete a multipart upload with POST, not PUT.",
                        headers={"Allow": "POST"})


@router.put("/storage/upload/multipart/{upload_id}/{part_number}",
            responses=error_responses(400, 401, 403, 404, 413, 422))
async def put_signed_part(
    request: Request, upload_id: str, part_number: int, token: Optional[str] = Query(None)
):
    svc = deps.services(request)
    _check_mp_token(svc, token, upload_id)
    etag = await _put_part(request, svc, upload_id, part_number)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": etag})


@router.post("/storage/upload/multipart/{upload_id}/complete", responses=error_responses(400, 401, 403, 404, 422))
async def complete_signed_multipart(
    request: Request, upload_id: str, token: Optional[str] = Query(None)
):
    svc = deps.services(request)
    _check_mp_token(svc, token, upload_id)
    stored = await _complete(request, svc, upload_id)
    return {"file_url": stored.url(public_base(request))}


# --------------------------------------------------------------------------------------------------
# Python client: CDN token + POST /files/upload


@router.post("/storage/auth/token", responses=error_responses(400, 401, 422))
async def storage_auth_token(
    request: Request,
    owner: Optional[str] = Depends(require_owner),
    _storage_type: None = Depends(_check_storage_type),  # after the credentials: a 401 comes first
):
    svc = deps.services(request)
    token, exp = svc.tokens.issue("cdn", CDN_TOKEN_TTL, o=owner)
    expires_at = _dt.datetime.fromtimestamp(exp, tz=_dt.timezone.utc)
    return {
        "token": token,
        "token_type": "Bearer",
        "base_url": public_base(request),
        "expires_at": expires_at.isoformat(timespec="seconds"),
    }


@router.post("/files/upload", responses=error_responses(400, 401, 403, 413, 415))
async def cdn_upload(request: Request, owner: Optional[str] = Depends(_cdn_or_api_key_owner)):
    svc = deps.services(request)
    stored = await _store_body(
        request,
        svc,
        content_type=request.headers.get("content-type"),
        file_name=request.headers.get("x-fal-file-name"),
        owner=owner,
        expires_in=_lifecycle_expires_in(request),
    )
    return _uploaded_body(request, svc, stored, "access_url")


@router.post("/files/upload/multipart", responses=error_responses(400, 401, 403, 415))
async def cdn_multipart_create(
    request: Request, owner: Optional[str] = Depends(_cdn_or_api_key_owner)
):
    svc = deps.services(request)
    mp = await _create_multipart(
        request, svc, request.headers.get("content-type"), request.headers.get("x-fal-file-name"), owner
    )
    return {"access_url": mp.file.url(public_base(request)), "uploadId": mp.upload_id}


async def _check_mp_file(svc: Services, file_id: str, file_name: str, upload_id: str) -> None:
    try:
        mp = await run_in_threadpool(svc.storage.get_multipart, upload_id)
    except StorageError as exc:
        _raise(exc)
    if mp.file.id != file_id or mp.file.file_name != file_name:
        raise HTTPException(status_code=404, detail="no such multipart upload")


@router.put("/files/{file_id}/{file_name}/multipart/{upload_id}/{part_number}",
            responses=error_responses(400, 401, 403, 404, 413, 422))
async def cdn_multipart_part(
    request: Request,
    file_id: str,
    file_name: str,
    upload_id: str,
    part_number: int,
    _owner: Optional[str] = Depends(_cdn_or_api_key_owner),
):
    svc = deps.services(request)
    await _check_mp_file(svc, file_id, file_name, upload_id)
    etag = await _put_part(request, svc, upload_id, part_number)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": etag})


@router.post("/files/{file_id}/{file_name}/multipart/{upload_id}/complete",
             responses=error_responses(400, 401, 403, 404))
async def cdn_multipart_complete(
    request: Request,
    file_id: str,
    file_name: str,
    upload_id: str,
    _owner: Optional[str] = Depends(_cdn_or_api_key_owner),
):
    svc = deps.services(request)
    await _check_mp_file(svc, file_id, file_name, upload_id)
    stored = await _complete(request, svc, upload_id)
    return {"access_url": stored.url(public_base(request))}


# --------------------------------------------------------------------------------------------------
# downloads and JWKS


def _file_headers(meta: StoredFile) -> dict[str, str]:
    return {
        "Content-Type": meta.content_type,
        "Content-Disposition": f'inline; filename="{meta.file_name}"',  # names are plain ASCII
        "ETag": meta.etag,
        "Last-Modified": email.utils.formatdate(meta.created_at or 0, usegmt=True),
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "public, max-age=3600",
    }


def _byte_range(request: Request, meta: StoredFile) -> Optional[tuple[int, int]]:
    """The one range [start, stop) a `Range` header asks for, or None for the whole file (no
    header, an If-Range that no longer matches, or several ranges: answered whole, as RFC 9110
    allows). Raises HTTPException 416 (unsatisfiable) or 400 (malformed)."""
    header = request.headers.get("range")
    if header is None:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range != meta.etag:
        return None
    try:
        # starlette's own parser (the one FileResponse uses): suffix, open-ended and merged ranges
        ranges = FileResponse._parse_range_header(header, meta.size)
    except MalformedRangeHeader as exc:
        raise HTTPException(status_code=400, detail=f"invalid Range header: {exc.content}") from None
    except RangeNotSatisfiable:
        raise HTTPException(
            status_code=416,
            detail=f"range not satisfiable: the file has {meta.size} bytes",
            headers={"Content-Range": f"bytes */{meta.size}"},
        ) from None
    return ranges[0] if len(ranges) == 1 else None


async def _stream_body(stream: FileStream) -> AsyncIterator[bytes]:
    """The stream's chunks, read off the event loop; the stream is closed however this ends
    (finished, client gone, backend failed mid-way)."""
    try:
        it = iter(stream)
        while True:
            chunk = await run_in_threadpool(next, it, None)
            if chunk is None:
                return
            yield chunk
    except StorageError as exc:
        log.warning("download interrupted: %s", exc.detail)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(stream.close)


@router.get("/files/{file_id}/{file_name}", responses=error_responses(404))
async def download_file(request: Request, file_id: str, file_name: str):
    svc = deps.services(request)
    if not is_valid_file_id(file_id):
        raise HTTPException(status_code=404, detail="no such file")
    try:
        meta = await run_in_threadpool(svc.storage.get, file_id)
    except FileNotFound:
        raise HTTPException(status_code=404, detail="no such file") from None
    except StorageError as exc:
        _raise(exc)
    if file_name != meta.file_name:
        raise HTTPException(status_code=404, detail="no such file")
    if getattr(request.app.state.settings, "storage_redirect", False):
        url = await run_in_threadpool(svc.storage.direct_url, meta, PRESIGNED_GET_TTL)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "private, no-store"})
    headers = _file_headers(meta)
    status, start, stop = 200, 0, meta.size
    rng = _byte_range(request, meta)
    if rng is not None:
        (start, stop), status = rng, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{meta.size}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    try:
        stream = await run_in_threadpool(svc.storage.read, file_id, start, stop)
    except FileNotFound:
        raise HTTPException(status_code=404, detail="no such file") from None
    except StorageError as exc:
        _raise(exc)
    return StreamingResponse(_stream_body(stream), status_code=status, headers=headers,
                             media_type=meta.content_type)


router.add_api_route(
    "/files/{file_id}/{file_name}", download_file, methods=["HEAD"], include_in_schema=False
)

@router.get("/.well-known/jwks.json")
async def jwks(request: Request):
    return JSONResponse(
        deps.services(request).signer.jwks(), headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"}
    )
