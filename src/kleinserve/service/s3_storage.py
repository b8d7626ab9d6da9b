"""`S3FileStorage`: the `FileStorage` interface on any S3-compatible object store, through boto3.

`--storage s3://BUCKET/PREFIX` selects it. The endpoint, region and credentials come only from what
boto3 itself reads (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/config, instance roles, ...), so AWS S3, Cloudflare R2, MinIO and Ceph RGW are
configured the same way. Addressing: boto3 picks path-style by itself for an IP endpoint; for a
DNS-named endpoint without wildcard DNS (a typical MinIO/Ceph install) add `?addressing_style=path`
to the storage URL, or set `s3 =\\n  addressing_style = path` in the AWS config file.

Keys under the prefix:

    files/<id>                   the bytes; everything else about the file is object metadata
    expiry/<unix time>-<id>      an empty marker for a file with its own lifecycle expiry
    uploads/<upload id>/meta     a multipart upload in progress (JSON: the future file's metadata)
    uploads/<upload id>/<part>   its parts, one object each

Metadata travels as object metadata (x-amz-meta-*) plus the native Content-Type and
Content-Disposition headers, not as a sidecar object: the bytes and their metadata appear in one
atomic PUT (no window in which one exists without the other, nothing to orphan), one HEAD answers
`get`, and a presigned or CDN GET serves the right type and file name by itself. Everything stored
is short ASCII (names are sanitised), well inside S3's 2 KB metadata limit.

Writes stream: up to 8 MiB are buffered, beyond that the object goes up as an S3 multipart upload
whose parts are sent while the client is still uploading; an object is only visible once complete,
so a failed upload leaves nothing readable behind (abandoned S3 multipart uploads are aborted by
`purge_older_than`). The fal clients' multipart uploads keep each client part as an object under
uploads/; completing maps them 1:1 onto an S3 multipart upload by server-side copy when every part
but the last has S3's minimum of 5 MiB (both official clients send 10 MiB parts), and otherwise
streams them through into a new object.

Every failure to reach the store (refused connection, timeout, 5xx, bad credentials, missing bucket)
becomes `StorageUnavailable` (HTTP 503 + Retry-After); timeouts and retries are bounded in the
botocore `Config`, so nothing waits long and the next call simply reconnects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import boto3
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from kleinserve.service.storage import (
    DEFAULT_MAX_UPLOAD_BYTES,
    MAX_MULTIPART_PARTS,
    FileNotFound,
    FileStorage,
    FileStream,
    FileTooLarge,
    InvalidUpload,
    MultipartUpload,
    PartWriter,
    StorageError,
    StorageUnavailable,
    StoredFile,
    UploadWriter,
    is_valid_file_id,
    new_file_id,
    new_file_meta,
    select_parts,
)

log = logging.getLogger(__name__)

S3_MIN_PART = 5 * 1024 * 1024  # S3's minimum size of every part but the last
WRITE_PART = 8 * 1024 * 1024  # our own part size when streaming a large object up
READ_CHUNK = 256 * 1024
RETRY_AFTER = 5
META_PREFIX = "ks-"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def default_config(addressing_style: Optional[str] = None) -> Config:
    """Short connect/read timeouts and a few quick retries: with the store down, a request fails
    in about a second instead of hanging; the pool reconnects by itself when it is back. Checksums
    only where S3 requires them (older Ceph, R2 and MinIO reject the newer default trailers)."""
    return Config(
        connect_timeout=2,
        read_timeout=15,
        retries={"total_max_attempts": 3, "mode": "standard"},
        max_pool_connections=64,  # a streaming download holds one for its whole length
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
        s3={"addressing_style": addressing_style} if addressing_style else None,
    )


class S3FileStorage(FileStorage):
    """Files in `bucket` under `prefix` ("" or ending in "/"). Thread-safe (one boto3 client)."""

    PARTIAL_UPLOAD_MAX_AGE = 24 * 3600.0

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        addressing_style: Optional[str] = None,
        config: Optional[Config] = None,
        public_base_url: Optional[str] = None,
    ):
        if max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.max_upload_bytes = int(max_upload_bytes)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        session = boto3.session.Session()
        self._client = session.client("s3", config=config or default_config(addressing_style))
        # /ready asks often and must answer fast: one attempt, short timeouts
        self._probe = session.client("s3", config=(config or default_config(addressing_style)).merge(
            Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self._client.meta.endpoint_url}"

    def close(self) -> None:
        self._client.close()
        self._probe.close()

    # keys and errors -----------------------------------------------------------------------
    def _file_key(self, file_id: str) -> str:
        if not is_valid_file_id(file_id):
            raise FileNotFound("no such file")
        return f"{self.prefix}files/{file_id}"

    def _expiry_key(self, meta: StoredFile) -> str:
        return f"{self.prefix}expiry/{int(meta.expires_at or 0):012d}-{meta.id}"

    def _upload_prefix(self, upload_id: str) -> str:
        if not is_valid_file_id(upload_id):
            raise FileNotFound("no such multipart upload")
        return f"{self.prefix}uploads/{upload_id}/"

    @contextmanager
    def _errors(self, what: str, not_found: str = "no such file") -> Iterator[None]:
        """Maps boto errors: a missing key to FileNotFound(not_found), anything else to
        StorageUnavailable with a detail that says what to check."""
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFound(not_found) from None
            if code == "NoSuchBucket":
                detail = f"the S3 bucket {self.bucket!r} does not exist: create it, or fix --storage"
            elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                detail = (f"the S3 store refused access to bucket {self.bucket!r} ({code}): check "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy")
            else:
                detail = f"the S3 store answered {status} {code} to {what}"
            log.warning("storage: %s failed: %s", what, detail)
            raise StorageUnavailable(f"file storage unavailable: {detail}; retry shortly",
                                     RETRY_AFTER) from None
        except NoCredentialsError:
            raise StorageUnavailable(
                "file storage unavailable: no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or an AWS profile or role)", RETRY_AFTER) from None
        except BotoCoreError as exc:
            log.warning("storage: %s failed: %s", what, exc)
            raise StorageUnavailable(
                f"file storage unavailable: cannot reach the S3 store ({type(exc).__name__}); "
                "retry shortly", RETRY_AFTER) from None

    # metadata -------------------------------------------------------------------------------
    @staticmethod
    def _object_metadata(meta: StoredFile) -> dict[str, str]:
        m = {"file-name": meta.file_name, "created-at": repr(float(meta.created_at))}
        if meta.owner is not None:
            m["owner"] = meta.owner
        if meta.expires_at is not None:
            m["expires-at"] = repr(float(meta.expires_at))
        if meta.sha256:
            m["sha256"] = meta.sha256
        return {META_PREFIX + k: v for k, v in m.items()}

    @staticmethod
    def _put_headers(meta: StoredFile) -> dict[str, Any]:
        return {
            "ContentType": meta.content_type,
            "ContentDisposition": f'inline; filename="{meta.file_name}"',
            "Metadata": S3FileStorage._object_metadata(meta),
        }

    @staticmethod
    def _meta_from_head(file_id: str, head: dict[str, Any]) -> StoredFile:
        m = {k[len(META_PREFIX):]: v for k, v in (head.get("Metadata") or {}).items()
             if k.startswith(META_PREFIX)}
        try:
            created = float(m.get("created-at", "0"))
            expires = float(m["expires-at"]) if "expires-at" in m else None
        except ValueError:
            raise FileNotFound("no such file") from None  # not one of ours
        if "file-name" not in m:
            raise FileNotFound("no such file")
        return StoredFile(
            id=file_id,
            file_name=m["file-name"],
            content_type=head.get("ContentType") or "application/octet-stream",
            size=int(head.get("ContentLength", 0)),
            created_at=created,
            owner=m.get("owner"),
            expires_at=expires,
            sha256=m.get("sha256"),
        )

    # reads ----------------------------------------------------------------------------------
    def ping(self) -> None:
        with self._errors(f"HEAD bucket {self.bucket}"):
            try:
                self._probe.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    raise ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket") from None
                raise

    def _head(self, file_id: str) -> StoredFile:
        """The metadata, expired or not; raises FileNotFound."""
        key = self._file_key(file_id)
        with self._errors(f"HEAD {key}"):
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        return self._meta_from_head(file_id, head)

    def get(self, file_id: str) -> StoredFile:
        meta = self._head(file_id)
        if meta.expires_at is not None and meta.expires_at <= time.time():
            raise FileNotFound("file expired")
        return meta

    def read(self, file_id: str, start: int = 0, stop: Optional[int] = None) -> FileStream:
        key = self._file_key(file_id)
        start = max(0, int(start))
        if stop is not None and stop <= start:
            return _S3Stream(None, self)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or stop is not None:
            args["Range"] = f"bytes={start}-" + ("" if stop is None else str(stop - 1))
        with self._errors(f"GET {key}"):
            obj = self._client.get_object(**args)
        return _S3Stream(obj["Body"], self)

    def direct_url(self, meta: StoredFile, expires_in: float) -> Optional[str]:
        key = self._file_key(meta.id)
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        # Signing is local: no request is made here.
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=max(1, int(expires_in)),
        )

    # writes ---------------------------------------------------------------------------------
    def writer(self, content_type, file_name, owner=None, *, file_id=None, expires_in=None):
        meta = new_file_meta(content_type, file_name, owner, file_id, expires_in)
        return _S3FileWriter(self, meta)

    def _put_expiry_marker(self, meta: StoredFile) -> None:
        """Before the file itself: a marker without its file is harmless (purge drops it)."""
        if meta.expires_at is not None:
            with self._errors("PUT expiry marker"):
                self._client.put_object(Bucket=self.bucket, Key=self._expiry_key(meta), Body=b"")

    def delete(self, file_id: str) -> bool:
        if not is_valid_file_id(file_id):
            return False
        try:
            meta = self._head(file_id)
        except FileNotFound:
            return False
        keys = [self._file_key(file_id)]
        if meta.expires_at is not None:
            keys.append(self._expiry_key(meta))
        self._delete_keys(keys)
        return True

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            with self._errors("DELETE objects"):
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _list(self, sub: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(f"LIST {self.prefix}{sub}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub):
                yield from page.get("Contents", [])

    def iter_file_ids(self) -> Iterator[str]:
        for obj in self._list("files/"):
            fid = obj["Key"].rsplit("/", 1)[-1]
            if is_valid_file_id(fid):
                yield fid

    def purge_older_than(self, seconds: float) -> int:
        now = time.time()
        cutoff = now - float(seconds)
        stale = now - max(float(seconds), self.PARTIAL_UPLOAD_MAX_AGE)
        # 1. files older than the retention (the object's own timestamp, from the listing)
        old: list[str] = []
        for obj in self._list("files/"):
            fid = obj["Key"].rsplit("/", 1)[-1]
            if is_valid_file_id(fid) and obj["LastModified"].timestamp() < cutoff:
                old.append(fid)
        gone = set(old)
        # 2. files past their own lifecycle expiry: the markers sort by time, stop at the first future one
        markers: list[str] = []
        for obj in self._list("expiry/"):
            name = obj["Key"].rsplit("/", 1)[-1]
            when, _, fid = name.partition("-")
            if not when.isdigit() or int(when) > now:
                break
            markers.append(obj["Key"])
            if is_valid_file_id(fid) and fid not in gone:
                try:
                    self._head(fid)
                except FileNotFound:
                    continue  # already deleted (or never completed)
                old.append(fid)
                gone.add(fid)
        self._delete_keys([self._file_key(f) for f in old] + markers)
        # 3. abandoned uploads: client parts under uploads/, and S3 multipart uploads never completed
        self._delete_keys([o["Key"] for o in self._list("uploads/") if o["LastModified"].timestamp() < stale])
        with self._errors("LIST multipart uploads"):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() < stale:
                        self._abort_s3_multipart(up["Key"], up["UploadId"])
        return len(old)

    def _abort_s3_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:  # best effort: purge_older_than retries later
            log.info("storage: could not abort the S3 multipart upload of %s: %s", key, exc)

    # multipart (the fal clients') ----------------------------------------------------------
    def create_multipart(self, content_type, file_name, owner=None, *, expires_in=None):
        meta = new_file_meta(content_type, file_name, owner, None, expires_in)
        upload_id = new_file_id()
        key = self._upload_prefix(upload_id) + "meta"
        with self._errors("PUT multipart upload"):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(meta.to_json()).encode(),
                                    ContentType="application/json")
        return MultipartUpload(upload_id=upload_id, file=meta)

    def get_multipart(self, upload_id: str) -> MultipartUpload:
        key = self._upload_prefix(upload_id) + "meta"
        with self._errors(f"GET {key}", not_found="no such multipart upload"):
            raw = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        try:
            meta = StoredFile(**json.loads(raw))
        except (ValueError, TypeError):
            raise FileNotFound("no such multipart upload") from None
        return MultipartUpload(upload_id=upload_id, file=meta)

    def _parts(self, upload_id: str) -> dict[int, int]:
        """The uploaded parts: {part number: size}."""
        out: dict[int, int] = {}
        for obj in self._list(self._upload_prefix(upload_id)[len(self.prefix):]):
            name = obj["Key"].rsplit("/", 1)[-1]
            if name.isdigit():
                out[int(name)] = int(obj["Size"])
        return out

    def multipart_part_writer(self, upload_id: str, part_number: int) -> PartWriter:
        self.get_multipart(upload_id)
        if not (1 <= int(part_number) <= MAX_MULTIPART_PARTS):
            raise InvalidUpload(f"part number must be between 1 and {MAX_MULTIPART_PARTS}")
        n = int(part_number)
        others = sum(size for p, size in self._parts(upload_id).items() if p != n)
        key = f"{self._upload_prefix(upload_id)}{n:05d}"
        return _S3PartWriter(self, key, counted_elsewhere=others)

    def complete_multipart(self, upload_id: str, parts: Optional[list[int]] = None) -> StoredFile:
        mp = self.get_multipart(upload_id)
        present = self._parts(upload_id)
        wanted = select_parts(present, parts)
        if not wanted:
            raise InvalidUpload("no parts uploaded")
        total = sum(present[p] for p in wanted)
        if total > self.max_upload_bytes:
            raise FileTooLarge(f"file exceeds the upload limit of {self.max_upload_bytes} bytes")
        part_keys = [f"{self._upload_prefix(upload_id)}{p:05d}" for p in wanted]
        expires_in = None
        if mp.file.expires_at is not None:
            expires_in = max(mp.file.expires_at - time.time(), 0.001)
        meta = new_file_meta(mp.file.content_type, mp.file.file_name, mp.file.owner, mp.file.id, expires_in)
        if all(present[p] >= S3_MIN_PART for p in wanted[:-1]) and len(wanted) > 1:
            stored = self._complete_by_copy(meta, part_keys, total)
        else:
            with _S3FileWriter(self, meta) as w:
                for key in part_keys:
                    with self._errors(f"GET {key}"):
                        body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                    with _S3Stream(body, self) as stream:
                        for chunk in stream:
                            w.write(chunk)
                stored = w.commit()
        self._delete_keys([o["Key"] for o in self._list(self._upload_prefix(upload_id)[len(self.prefix):])])
        return stored

    def _complete_by_copy(self, meta: StoredFile, part_keys: list[str], total: int) -> StoredFile:
        """Client parts -> S3 parts by server-side copy: no byte passes through this process (so the
        file's sha256 stays unknown: its ETag is derived from id, size and time instead)."""
        key = self._file_key(meta.id)
        stored = StoredFile(**{**meta.to_json(), "size": total})
        self._put_expiry_marker(stored)
        with self._errors(f"CreateMultipartUpload {key}"):
            up = self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **self._put_headers(meta))
        upload_id = up["UploadId"]
        try:
            done = []
            for i, src in enumerate(part_keys, start=1):
                with self._errors(f"UploadPartCopy {src}"):
                    r = self._client.upload_part_copy(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=i,
                        CopySource={"Bucket": self.bucket, "Key": src})
                done.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            with self._errors(f"CompleteMultipartUpload {key}"):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done})
        except BaseException:
            self._abort_s3_multipart(key, upload_id)
            raise
        return stored


class _S3Stream(FileStream):
    def __init__(self, body: Any, storage: S3FileStorage):
        self._body = body
        self._storage = storage

    def __iter__(self) -> Iterator[bytes]:
        if self._body is None:
            return
        with self._storage._errors("reading an object"):
            try:
                yield from self._body.iter_chunks(READ_CHUNK)
            except (OSError, urllib3.exceptions.HTTPError) as exc:  # what botocore does not wrap
                raise StorageUnavailable(
                    f"file storage unavailable: reading the object failed ({type(exc).__name__})",
                    RETRY_AFTER) from None

    def close(self) -> None:
        if self._body is not None:
            self._body.close()


class _S3Upload:
    """Streams one object up: buffered up to WRITE_PART bytes, then as an S3 multipart upload with a
    part sent each time the buffer fills. Only `finish` makes the object visible."""

    def __init__(self, storage: S3FileStorage, key: str, headers: dict[str, Any], counted_elsewhere: int = 0):
        self._s = storage
        self._key = key
        self._headers = headers
        self._buf = bytearray()
        self._size = 0
        self._counted_elsewhere = counted_elsewhere
        self._upload_id: Optional[str] = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def _write(self, chunk: bytes) -> None:
        if self._done:
            raise InvalidUpload("upload already finished")
        self._size += len(chunk)
        if self._counted_elsewhere + self._size > self._s.max_upload_bytes:
            self.abort()
            raise FileTooLarge(f"file exceeds the upload limit of {self._s.max_upload_bytes} bytes")
        self._buf += chunk
        while len(self._buf) >= WRITE_PART:
            part, self._buf = bytes(self._buf[:WRITE_PART]), self._buf[WRITE_PART:]
            try:
                self._send_part(part)
            except BaseException:
                self.abort()
                raise

    def _send_part(self, data: bytes) -> None:
        c, b = self._s._client, self._s.bucket
        if self._upload_id is None:
            with self._s._errors(f"CreateMultipartUpload {self._key}"):
                self._upload_id = c.create_multipart_upload(Bucket=b, Key=self._key, **self._headers)["UploadId"]
        n = len(self._parts) + 1
        with self._s._errors(f"UploadPart {self._key}"):
            r = c.upload_part(Bucket=b, Key=self._key, UploadId=self._upload_id, PartNumber=n, Body=data)
        self._parts.append({"PartNumber": n, "ETag": r["ETag"]})

    def _finish(self, headers: Optional[dict[str, Any]] = None) -> None:
        if self._done:
            raise InvalidUpload("upload already finished")
        c, b = self._s._client, self._s.bucket
        try:
            if self._upload_id is None:
                with self._s._errors(f"PUT {self._key}"):
                    c.put_object(Bucket=b, Key=self._key, Body=bytes(self._buf), **(headers or self._headers))
            else:
                if self._buf or not self._parts:
                    self._send_part(bytes(self._buf))
                with self._s._errors(f"CompleteMultipartUpload {self._key}"):
                    c.complete_multipart_upload(Bucket=b, Key=self._key, UploadId=self._upload_id,
                                                MultipartUpload={"Parts": self._parts})
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buf = bytearray()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._upload_id is not None:
            self._s._abort_s3_multipart(self._key, self._upload_id)


class _S3FileWriter(_S3Upload, UploadWriter):
    def __init__(self, storage: S3FileStorage, meta: StoredFile):
        # The metadata of a streamed (multipart) upload is fixed when it starts: sha256 is then
        # unknown; a small file (the usual case) is one PUT at commit, with its sha256.
        super().__init__(storage, storage._file_key(meta.id), S3FileStorage._put_headers(meta))
        self._meta = meta
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._write(chunk)

    def commit(self) -> StoredFile:
        streamed = self._upload_id is not None
        meta = StoredFile(**{**self._meta.to_json(), "size": self._size,
                             "sha256": None if streamed else self._hash.hexdigest()})
        try:
            self._s._put_expiry_marker(meta)
        except BaseException:
            self.abort()
            raise
        self._finish(S3FileStorage._put_headers(meta))
        return meta


class _S3PartWriter(_S3Upload, PartWriter):
    def __init__(self, storage: S3FileStorage, key: str, counted_elsewhere: int):
        super().__init__(storage, key, {"ContentType": "application/octet-stream"}, counted_elsewhere)
        self._md5 = hashlib.md5(usedforsecurity=False)

    def write(self, chunk: bytes) -> None:
        self._md5.update(chunk)
        self._write(chunk)

    def commit(self) -> str:
        self._finish()
        return f'"{self._md5.hexdigest()}"'


__all__ = ["S3FileStorage", "StorageError", "default_config"]
